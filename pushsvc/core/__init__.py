"""pushsvc.core."""
