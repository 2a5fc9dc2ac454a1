"""pushsvc.ws."""
