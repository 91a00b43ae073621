"""Objects made for one exact set of buffer addresses (an ONNX Runtime IOBinding, a captured CUDA graph),
reused while those addresses come back.

The ring has T+1 rotation states, so a running stream cycles through a handful of address sets and every
backend ends up replaying ready entries. Addresses that never return (buffers re-allocated for a new batch
size or a new ring) are dropped by starting over when the cache is full: simpler than tracking liveness and
cheap, since only a new state pays for a fresh entry.
"""
from __future__ import annotations

from typing import Callable, Hashable

# Entries per cache: far above the T+1 ring states (times the batch sizes) a segmenter uses.
MAX_ENTRIES = 64


class AddressKeyedCache:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: dict = {}

    def get(self, key: Hashable):
        return self._entries.get(key)

    def put(self, key: Hashable, value):
        if len(self._entries) >= self.max_entries:  # stale addresses after re-allocations: start over
            self._entries.clear()
        self._entries[key] = value
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], object]):
        """The entry for ``key``, made by ``make()`` the first time."""
        value = self._entries.get(key)
        return self.put(key, make()) if value is None else value

    def clear(self):
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
