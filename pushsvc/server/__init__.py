"""pushsvc.server."""
