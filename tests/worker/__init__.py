"""Sagas through real workers (threads and prefork) and a real Redis."""
