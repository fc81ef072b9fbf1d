"""fedcare package."""
