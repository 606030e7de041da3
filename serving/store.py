"""Durable interaction events (SQLite in WAL mode): what `/events` appends and what a known
user's history is read from. Exportable as an interactions file the training flow ingests
(`data.source: files`)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class EventStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL,"
            " item_id TEXT NOT NULL, timestamp INTEGER NOT NULL, weight REAL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS events_user ON events (user_id, timestamp, seq)")
        self._db.execute("CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, text TEXT NOT NULL)")

    def add(self, user_id: str, item_id: str, timestamp: int, weight: float | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO events (user_id, item_id, timestamp, weight) VALUES (?, ?, ?, ?)",
                             (user_id, item_id, timestamp, weight))

    def history(self, user_id: str, limit: int) -> list[str]:
        """The user's last `limit` items, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id FROM events WHERE user_id = ? ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [r[0] for r in reversed(rows)]

    def has_user(self, user_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM events WHERE user_id = ? LIMIT 1", (user_id,)).fetchone() is not None

    def add_item(self, item_id: str, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO items (item_id, text) VALUES (?, ?)", (item_id, text))

    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute("SELECT item_id, text FROM items ORDER BY rowid").fetchall()

    def export_csv(self, path: Path) -> int:
        """Interactions as CSV (user_id, item_id, timestamp, weight); returns the row count."""
        import csv

        with self._lock:
            rows = self._db.execute("SELECT user_id, item_id, timestamp, weight FROM events ORDER BY seq").fetchall()
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp", "weight"])
            w.writerows(rows)
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def main() -> int:
    """`python -m serving.store export --db events.db --out interactions.csv`: the events as an
    interactions file for `data.source: files` (the feedback loop into training)."""
    import argparse

    parser = argparse.ArgumentParser(description="Export the service's events for training.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.db.exists():
        parser.error(f"{args.db} does not exist")
    store = EventStore(args.db)
    n = store.export_csv(args.out)
    store.close()
    print(f"{n} events -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
