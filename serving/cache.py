"""The response cache: recent answers, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class ResponseCache:
    """At most `max_entries` answers (0: no cache). Callers put the model version, the
    catalogue version and the user's event count in the key, so a stale answer is never hit."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        if not self.max_entries:
            return None
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        if not self.max_entries:
            return
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
