"""The store's error, in a module of its own so that the store and its integrity checks
(store/integrity.py) both raise it without importing each other."""
from __future__ import annotations


class StoreError(ValueError):
    """A store that is missing, incomplete, damaged, or does not match what the caller asked for."""
