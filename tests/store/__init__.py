"""The store's scripts against a real Redis, record by record."""
