"""Task data for the embedded demo model."""
