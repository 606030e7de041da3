"""Impression logging off the request's hot path: `/recommend` hands over the answer's bytes (a
queue put, no parsing, no I/O); one thread parses them and writes them to the event store in
batches. Memory is bounded by the queue: when the store is slow or locked, impressions are dropped
and counted, and no request ever waits or fails for them.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable

import orjson

from serving.store import EventStore, Impression

log = logging.getLogger("serving")

BATCH = 512
_STOP = object()


class ImpressionLog:
    def __init__(self, store: EventStore, rate: float, max_queue: int,
                 count: Callable[[str, int], None] = lambda result, n: None):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the impression sampling rate must be in [0, 1], got {rate}")
        self.store, self.rate, self.count = store, rate, count
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._random = random.Random()
        self._thread = threading.Thread(target=self._drain, name="impression-writer", daemon=True)
        self._thread.start()
        self._last_warning = 0.0

    def offer(self, request_id: str, user_id: str, model_version: str, variant: str, body: bytes,
              catalog_size: int, shown_at: float | None = None) -> None:
        """Queue one answer (`body`: the `/recommend` JSON) for logging. `shown_at` defaults to
        now (a shadow list gives the time its champion's list was shown)."""
        try:
            self._queue.put_nowait((request_id, user_id, model_version, variant,
                                    time.time() if shown_at is None else shown_at, body, catalog_size))
        except queue.Full:
            self.count("dropped", 1)

    def sampled(self) -> bool:
        """Whether this request's answer is to be logged (counted when it is not)."""
        if self.rate >= 1.0 or self._random.random() < self.rate:
            return True
        self.count("sampled_out", 1)
        return False

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(job is _STOP for job in batch)
            rows = [self._row(job) for job in batch if job is not _STOP]
            if not rows:
                continue
            try:
                self.store.add_impressions(rows)
                self.count("logged", len(rows))
            except Exception as exc:  # a locked or failing store: these impressions are lost, counted
                self.count("dropped", len(rows))
                if time.monotonic() - self._last_warning > 60:
                    self._last_warning = time.monotonic()
                    log.warning("impressions dropped (%d): %s", len(rows), exc)

    @staticmethod
    def _row(job: tuple) -> Impression:
        request_id, user_id, model_version, variant, shown_at, body, catalog_size = job
        items = orjson.loads(body)["items"]
        return Impression(request_id, user_id, model_version, variant, shown_at,
                          tuple(i["item_id"] for i in items), tuple(float(i["score"]) for i in items), catalog_size)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop."""
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
