"""starmesh.runtime."""
