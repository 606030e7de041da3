"""The response cache: recent answers as JSON bytes, bounded in bytes, least recently used first
out.

Keys are 16-byte digests of the request (a history can be 1,000 ids of 256 characters), values
the answer's bytes, so the bound is the memory actually held, give or take a fixed overhead per
entry."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import orjson

# Per entry, besides the answer: the key, the dict slot, the bytes object's header.
ENTRY_OVERHEAD = 200


class ResponseCache:
    """At most `max_bytes` of answers (0: no cache). Callers put the model version, the
    catalogue version and the user's event count in the key, so a stale answer is never hit."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        # The event loop reads and writes; a model swap or a catalogue sync clears from a thread.
        self._lock = threading.Lock()

    @staticmethod
    def key(*parts: object) -> bytes:
        return hashlib.blake2b(orjson.dumps(parts), digest_size=16).digest()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: bytes, value: bytes) -> None:
        size = len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= len(old) + ENTRY_OVERHEAD
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= len(dropped) + ENTRY_OVERHEAD

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
