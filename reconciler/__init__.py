"""starmesh.reconciler."""
