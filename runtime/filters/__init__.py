"""The proxy's filters: one concern per module, assembled per route by runtime/chain.py."""
