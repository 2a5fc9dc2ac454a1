"""pushsvc.auth."""
