"""Durable interaction events, added items and impressions (SQLite in WAL mode): what `/events`
appends, what a known user's history is read from, what `/items` adds (shared by every process on
the same file), and what `/recommend` showed (the online evaluation's input, `serving/online.py`).
Exportable as an interactions file the training flow ingests (`data.source: files`).

Writes go through one connection with a busy timeout: when another process holds the database
locked past it, `StoreBusy` is raised (the service answers 503, Retry-After), never a hang.
Reads use their own connection: in WAL mode they do not wait for writers.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

BUSY_TIMEOUT_S = 2.0


class StoreBusy(RuntimeError):
    """The database stayed locked by another writer past the busy timeout."""


@dataclass(frozen=True)
class DataRules:
    """What training validation accepts of an event (the bundle carries its training data's
    rules, `bundle.json` `data_rules`): events that break them are refused at the door, so one
    bad event can never block a retrain from exported events."""

    min_timestamp: int = 0
    max_future_seconds: int = 86_400
    weight_min: float | None = None
    weight_max: float | None = None

    def problems(self, timestamp: int, weight: float | None, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        out = []
        if timestamp < self.min_timestamp:
            out.append(f"timestamp {timestamp} is before {self.min_timestamp} (the training data's minimum)")
        if timestamp > now + self.max_future_seconds:
            out.append(f"timestamp {timestamp} is in the future (more than {self.max_future_seconds} s ahead)")
        if weight is not None:
            if not math.isfinite(weight):
                out.append(f"weight {weight} is not a finite number")
            elif self.weight_min is not None and weight < self.weight_min:
                out.append(f"weight {weight} is below {self.weight_min}")
            elif self.weight_max is not None and weight > self.weight_max:
                out.append(f"weight {weight} is above {self.weight_max}")
        return out


@dataclass(frozen=True)
class Export:
    exported: int
    quarantined: int
    # The last event number read: the next export starts after it.
    last_seq: int
    # Events after it left for a later export (received too recently to be settled).
    waiting: int = 0


@dataclass(frozen=True)
class Impression:
    """One list `/recommend` answered (or a shadow model would have): its items by position."""

    request_id: str
    user_id: str
    model_version: str
    variant: str
    shown_at: float
    items: tuple[str, ...]
    scores: tuple[float, ...]
    catalog_size: int


def id_problem(value: object, name: str) -> str | None:
    """Why a stored id could not be trained on (None: it can): training validation refuses the
    same ids (components/validate.py ID_REFUSED; a test holds the two to agree), `/events` and
    `/items` refuse them at the door and the export quarantines them. Control characters (tab
    and newline among them, DEL), U+FFFD (undecodable bytes), a blank id, over 256 characters."""
    if not isinstance(value, str) or not value or len(value) > 256:
        return f"{name} must be 1-256 characters"
    if "\ufffd" in value:
        return f"{name} holds U+FFFD at position {value.index(chr(0xFFFD))} (undecodable bytes)"
    bad = next((i for i, c in enumerate(value) if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"{name} holds the control character {value[bad]!r} at position {bad}"
    if not value.strip():
        return f"{name} is blank"
    return None


def is_url(db: Path | str) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def store_arg(text: str) -> Path | str:
    """A `--db` value: a `postgresql://` URL as given, anything else a SQLite file path."""
    return text if is_url(text) else Path(text)


def not_a_store(db: Path | str) -> str | None:
    """Why `db` is not an existing event store a reader may open (None: it is one, or a URL,
    which the connection itself checks). Opening a store creates its tables, so a reader that
    skipped this would turn a mistyped path, an empty file or another SQLite database into one."""
    if is_url(db):
        return None
    path = Path(db)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is a folder, not the service's event store (a SQLite file)"
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as exc:  # unreadable, or locked past the timeout: say what SQLite says
        return f"{path} cannot be read as an SQLite database: {exc}"
    except sqlite3.DatabaseError:
        return f"{path} is not a SQLite database, so not the service's event store"
    if "events" not in tables:
        return f"{path} holds no events table: not the service's event store" + ("" if tables else " (it is empty)")
    return None


# The same tables on both backends; the types and auto-increments differ.
_SCHEMA = {
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL,"
        " item_id TEXT NOT NULL, timestamp INTEGER NOT NULL, weight REAL)",
        "CREATE INDEX IF NOT EXISTS events_user ON events (user_id, timestamp, seq)",
        "CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, text TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS impressions (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,"
        " user_id TEXT NOT NULL, model_version TEXT NOT NULL, variant TEXT NOT NULL, shown_at REAL NOT NULL,"
        " items TEXT NOT NULL, scores TEXT NOT NULL, catalog_size INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS impressions_shown ON impressions (shown_at)",
    ],
    "postgres": [
        "CREATE TABLE IF NOT EXISTS events (seq BIGSERIAL PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT NOT NULL,"
        " timestamp BIGINT NOT NULL, weight DOUBLE PRECISION, received_at DOUBLE PRECISION)",
        "CREATE INDEX IF NOT EXISTS events_user ON events (user_id, timestamp, seq)",
        "CREATE INDEX IF NOT EXISTS events_received ON events (received_at)",
        # `seq` moves on every insert or replace: what `items_version` watches.
        "CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, text TEXT NOT NULL, seq BIGSERIAL)",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS impressions (id BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL,"
        " user_id TEXT NOT NULL, model_version TEXT NOT NULL, variant TEXT NOT NULL, shown_at DOUBLE PRECISION"
        " NOT NULL, items TEXT NOT NULL, scores TEXT NOT NULL, catalog_size INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS impressions_shown ON impressions (shown_at)",
    ],
}
_UPSERT = {  # (table, key column, value column)
    "sqlite": "INSERT OR REPLACE INTO {0} ({1}, {2}) VALUES (?, ?)",
    "postgres": "INSERT INTO {0} ({1}, {2}) VALUES (?, ?) ON CONFLICT ({1}) DO UPDATE SET {2} = EXCLUDED.{2}",
}


class EventStore:
    """`db`: a SQLite file (the embedded default), or a `postgresql://` URL: one store shared
    by several service replicas, each seeing the others' events and items."""

    def __init__(self, db: Path | str, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.kind = "postgres" if is_url(db) else "sqlite"
        self.path = db if self.kind == "postgres" else Path(db)
        self.where = _redacted(str(db))
        self._write_lock, self._read_lock = threading.Lock(), threading.Lock()
        if self.kind == "postgres":
            self._writer, self._reader = (_pg_connect(str(db), busy_timeout_s) for _ in range(2))
            # Replicas starting together would race on CREATE ... IF NOT EXISTS: one at a time.
            self._writer.execute("SELECT pg_advisory_lock(7342001)")
            try:
                for statement in _SCHEMA["postgres"]:
                    self._writer.execute(statement)
            finally:
                self._writer.execute("SELECT pg_advisory_unlock(7342001)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA["sqlite"]:
            self._writer.execute(statement)
        # When the service received an event (its `timestamp` is the client's): impressions are
        # attributed on the service's clock. Stores written before impressions existed get it.
        if "received_at" not in {r[1] for r in self._writer.execute("PRAGMA table_info(events)")}:
            self._writer.execute("ALTER TABLE events ADD COLUMN received_at REAL")
        self._writer.execute("CREATE INDEX IF NOT EXISTS events_received ON events (received_at)")
        self._reader = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgres" else sql

    def _busy(self, exc: Exception) -> StoreBusy | None:
        """The backend's "another writer holds the lock" as StoreBusy (None: another error)."""
        if self.kind == "sqlite":
            text = str(exc)
            busy = isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
        else:
            import psycopg.errors

            busy = isinstance(exc, (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled))
        return StoreBusy(f"the event store {self.where} is locked by another writer") if busy else None

    def _write(self, sql: str, args: tuple) -> None:
        with self._write_lock:
            try:
                self._writer.execute(self._sql(sql), args)
            except Exception as exc:
                busy = self._busy(exc)
                if busy is not None:
                    raise busy from exc
                raise

    def _write_many(self, sql: str, rows: list[tuple]) -> None:
        """All rows in one transaction (one fsync for a batch of impressions)."""
        with self._write_lock:
            try:
                if self.kind == "postgres":
                    with self._writer.transaction(), self._writer.cursor() as cur:
                        cur.executemany(self._sql(sql), rows)
                    return
                self._writer.execute("BEGIN IMMEDIATE")
            except Exception as exc:
                busy = self._busy(exc)
                if busy is not None:
                    raise busy from exc
                raise
            try:
                self._writer.executemany(sql, rows)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self._reader.execute(self._sql(sql), args).fetchall()

    def add(self, user_id: str, item_id: str, timestamp: int, weight: float | None = None) -> None:
        self._write("INSERT INTO events (user_id, item_id, timestamp, weight, received_at) VALUES (?, ?, ?, ?, ?)",
                    (user_id, item_id, timestamp, weight, time.time()))

    def add_many(self, rows: list[tuple[str, str, int, float | None]]) -> None:
        """(user, item, timestamp, weight) events in one transaction: a backfill or import."""
        now = time.time()
        self._write_many("INSERT INTO events (user_id, item_id, timestamp, weight, received_at) VALUES (?, ?, ?, ?, ?)",
                         [(*row, now) for row in rows])

    def add_impressions(self, rows: list[Impression]) -> None:
        self._write_many(
            "INSERT INTO impressions (request_id, user_id, model_version, variant, shown_at, items, scores,"
            " catalog_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.request_id, r.user_id, r.model_version, r.variant, r.shown_at, json.dumps(list(r.items)),
              json.dumps(list(r.scores)), r.catalog_size) for r in rows])

    def impressions(self, since: float, until: float) -> list[Impression]:
        """Impressions shown in [since, until), in the order they were shown."""
        rows = self._read("SELECT request_id, user_id, model_version, variant, shown_at, items, scores, catalog_size"
                          " FROM impressions WHERE shown_at >= ? AND shown_at < ? ORDER BY shown_at, id",
                          (since, until))
        return [Impression(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), tuple(json.loads(r[6])), r[7])
                for r in rows]

    def received(self, since: float, until: float) -> list[tuple[str, str, float]]:
        """(user, item, received_at) of the events received in [since, until), in arrival order."""
        return self._read("SELECT user_id, item_id, received_at FROM events WHERE received_at >= ? AND received_at < ?"
                          " ORDER BY received_at, seq", (since, until))

    def last_seq(self, received_before: float | None = None) -> int:
        """The number of the last event (received before `received_before`, when given); 0 if none."""
        if received_before is None:
            rows = self._read("SELECT coalesce(max(seq), 0) FROM events")
        else:
            # Rows written before arrival times were recorded count as received before anything.
            rows = self._read("SELECT coalesce(max(seq), 0) FROM events WHERE received_at IS NULL OR received_at < ?",
                              (received_before,))
        return int(rows[0][0])

    def history(self, user_id: str, limit: int) -> list[str]:
        """The user's last `limit` items, oldest first."""
        rows = self._read("SELECT item_id FROM events WHERE user_id = ? ORDER BY timestamp DESC, seq DESC LIMIT ?",
                          (user_id, limit))
        return [r[0] for r in reversed(rows)]

    def has_user(self, user_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM events WHERE user_id = ? LIMIT 1", (user_id,)))

    def add_item(self, item_id: str, text: str) -> None:
        if self.kind == "postgres":
            self._write("INSERT INTO items (item_id, text) VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE SET"
                        " text = EXCLUDED.text, seq = nextval(pg_get_serial_sequence('items', 'seq'))", (item_id, text))
        else:
            self._write(_UPSERT["sqlite"].format("items", "item_id", "text"), (item_id, text))

    def _order(self) -> str:
        return "seq" if self.kind == "postgres" else "rowid"

    def items(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self._read(f"SELECT item_id, text FROM items ORDER BY {self._order()}")]

    def items_version(self) -> tuple[int, int]:
        """Changes whenever an item is added or replaced, by any process."""
        count, last = self._read(f"SELECT count(*), coalesce(max({self._order()}), 0) FROM items")[0]
        return int(count), int(last)

    def set_rules(self, rules: DataRules) -> None:
        self._write(_UPSERT[self.kind].format("meta", "key", "value"), ("data_rules", json.dumps(asdict(rules))))

    def rules(self) -> DataRules | None:
        rows = self._read("SELECT value FROM meta WHERE key = 'data_rules'")
        return DataRules(**json.loads(rows[0][0])) if rows else None

    def export_csv(self, path: Path, quarantine: Path, after_seq: int = 0, rules: DataRules | None = None,
                   received_before: float | None = None) -> "Export":
        """Interactions as CSV (user_id, item_id, timestamp, weight), those received after the
        event numbered `after_seq` (0: all); rows training validation would refuse (`rules`,
        default: the rules the service last recorded) go to `quarantine` with the reason. The
        returned `last_seq` is the watermark of the next export.

        `received_before`: the export stops at the first event received at or after this time
        (epoch seconds, the caller's clock; `received_at` is the writing replica's), so the
        watermark does not pass an event another replica numbered earlier but has not committed
        yet, provided every write commits within the margin the caller left and the clocks agree;
        `Export.waiting` counts the events left for later."""
        rules = rules or self.rules() or DataRules()
        rows = self._read("SELECT seq, user_id, item_id, timestamp, weight, received_at FROM events WHERE seq > ?"
                          " ORDER BY seq", (after_seq,))
        waiting = 0
        if received_before is not None:
            # Rows from before arrival times were recorded count as settled.
            fresh = next((i for i, r in enumerate(rows) if r[5] is not None and r[5] >= received_before), None)
            if fresh is not None:
                waiting, rows = len(rows) - fresh, rows[:fresh]
        rows = [r[:5] for r in rows]
        now = time.time()
        good, bad = [], []
        for _, user, item, ts, weight in rows:
            reasons = [p for p in (id_problem(user, "user_id"), id_problem(item, "item_id")) if p]
            if not isinstance(ts, int) or isinstance(ts, bool):
                reasons.append(f"timestamp {ts!r} is not an integer")
            else:
                reasons += rules.problems(ts, weight, now)
            (bad if reasons else good).append((user, item, ts, weight, "; ".join(reasons)))
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp", "weight"])
            w.writerows(r[:4] for r in good)
        with quarantine.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp", "weight", "reason"])
            w.writerows(bad)
        return Export(len(good), len(bad), int(rows[-1][0]) if rows else after_seq, waiting)

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()


def _pg_connect(url: str, busy_timeout_s: float):
    import psycopg

    # Autocommit: every read sees what other replicas committed; a writer waits at most the
    # busy timeout for a lock (then StoreBusy, a 503), like SQLite's.
    return psycopg.connect(url, autocommit=True, connect_timeout=10,
                           options=f"-c lock_timeout={int(busy_timeout_s * 1000)}")


def _redacted(db: str) -> str:
    """The store as messages name it: a URL without its password."""
    if not is_url(db):
        return db
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)


def main() -> int:
    """`python -m serving.store export --db events.db --out interactions.csv`: the events as an
    interactions file for `data.source: files` (the feedback loop into training); events that
    training would refuse go to `--quarantine` (default: beside the output) with the reason."""
    import argparse

    parser = argparse.ArgumentParser(description="Export the service's events for training.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--db", type=store_arg, required=True, help="a SQLite file or a postgresql:// URL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quarantine", type=Path, default=None)
    parser.add_argument("--after-seq", type=int, default=0,
                        help="only events received after this event number (a previous export's watermark)")
    parser.add_argument("--settle-seconds", type=float, default=0.0,
                        help="stop at the first event received less than this long ago (replicas on PostgreSQL "
                             "commit event numbers out of order; the watermark must not pass one still being written)")
    args = parser.parse_args()
    if not args.settle_seconds >= 0:
        parser.error("--settle-seconds must be a number >= 0")
    problem = not_a_store(args.db)
    if problem:
        parser.error(f"--db: {problem}")
    quarantine = args.quarantine or args.out.with_name(args.out.stem + ".quarantine.csv")
    for path in (args.out, quarantine):
        if not path.parent.is_dir():
            parser.error(f"{path}: no folder {path.parent} to write it in")
    store = EventStore(args.db)
    result = store.export_csv(args.out, quarantine, args.after_seq,
                              received_before=time.time() - args.settle_seconds if args.settle_seconds else None)
    store.close()
    print(f"{result.exported} events -> {args.out}; {result.quarantined} quarantined -> {quarantine}; "
          f"watermark {result.last_seq}" + (f"; {result.waiting} received too recently, left for the next export"
                                            if result.waiting else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
