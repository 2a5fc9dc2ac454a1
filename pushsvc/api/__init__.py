"""pushsvc.api."""
