"""pushsvc.config."""
