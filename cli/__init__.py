"""The `starmesh` command line."""
