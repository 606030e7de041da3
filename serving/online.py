"""Online metrics: how the lists the service showed did, per model version and variant.

Attribution (last touch, on the service's clock): an impression's window opens when the list is
shown and closes `attribution_seconds` later, or at the same user's next impression of the same
variant, whichever comes first. The impression is a hit when an event of that user received in
its window is on one of the first k items shown; the earliest such event gives the position
(NDCG@k = 1/log2(position + 1), MRR@k = 1/position). When every list is followed by one event
before the next list (a replay), this is exactly the offline next-item HR@k / NDCG@k.

Shadow impressions (lists a challenger ranked but nobody saw) are attributed by the same rule,
against what the user did after seeing the champion's list: a counterfactual estimate that
favours the champion, whose items the user was shown (README, "Online evaluation").

Each metric is averaged per user first, then over users; the 95 % interval is over users
(normal approximation), the unit decisions are made on.

    python -m serving.online --db artifacts/serving/events.db --since 24h [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime

from serving.store import EventStore, Impression, not_a_store, store_arg

METRICS = ("hr", "ndcg", "mrr")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class OnlineMetrics:
    model_version: str
    variant: str
    k: int
    requests: int
    users: int
    hits: int
    hr: Interval
    ndcg: Interval
    mrr: Interval
    # Distinct items shown in the top k, and that over the catalogue's size.
    distinct_items: int
    coverage: float

    def flat(self) -> dict[str, float | int | str]:
        """`online_ndcg@10`, `online_ndcg@10_low`, ... (the JSON and MLflow names)."""
        out: dict[str, float | int | str] = {"model_version": self.model_version, "variant": self.variant,
                                             "requests": self.requests, "users": self.users, "hits": self.hits}
        for name in METRICS:
            iv: Interval = getattr(self, name)
            out[f"online_{name}@{self.k}"] = iv.mean
            out[f"online_{name}@{self.k}_low"] = iv.low
            out[f"online_{name}@{self.k}_high"] = iv.high
        out[f"online_coverage@{self.k}"] = self.coverage
        return out


def interval(values: list[float]) -> Interval:
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = 1.959964 * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half)


def attribute(impressions: list[Impression], events: list[tuple[str, str, float]], k: int,
              attribution_seconds: float) -> list[tuple[Impression, int | None]]:
    """Each impression with the position (1-based, within k) of its attributed event, or None."""
    times: dict[str, list[float]] = defaultdict(list)
    items: dict[str, list[str]] = defaultdict(list)
    for user, item, at in sorted(events, key=lambda e: e[2]):
        times[user].append(at)
        items[user].append(item)
    following: dict[tuple[str, str], list[Impression]] = defaultdict(list)
    for imp in impressions:
        following[(imp.user_id, imp.variant)].append(imp)
    out = []
    for shown in following.values():
        shown.sort(key=lambda i: i.shown_at)
        for n, imp in enumerate(shown):
            end = imp.shown_at + attribution_seconds
            if n + 1 < len(shown):
                end = min(end, shown[n + 1].shown_at)
            top = {item: pos for pos, item in enumerate(imp.items[:k], start=1)}
            at, did = times.get(imp.user_id, []), items.get(imp.user_id, [])
            position = None
            for j in range(bisect_right(at, imp.shown_at), len(at)):
                if at[j] > end:
                    break
                if did[j] in top:
                    position = top[did[j]]
                    break
            out.append((imp, position))
    return out


def per_user(impressions: list[Impression], events: list[tuple[str, str, float]], k: int = 10,
             attribution_seconds: float = 1800.0) -> dict[tuple[str, str], dict[str, float]]:
    """{(model version, variant): {user: mean NDCG@k of the user's lists}}: what decisions
    compare, user by user."""
    sums: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for imp, pos in attribute(impressions, events, k, attribution_seconds):
        sums[(imp.model_version, imp.variant)][imp.user_id].append(0.0 if pos is None else 1.0 / math.log2(pos + 1))
    return {group: {u: sum(v) / len(v) for u, v in users.items()} for group, users in sums.items()}


def lift(champion: dict[str, float], challenger: dict[str, float]) -> Interval:
    """The challenger's mean minus the champion's, with a 95 % interval over users: paired on the
    users both served (shadow: one user, two lists), else two independent groups (A/B)."""
    shared = champion.keys() & challenger.keys()
    if shared and len(shared) >= 0.5 * min(len(champion), len(challenger)):
        return interval([challenger[u] - champion[u] for u in shared])
    a, b = interval(list(champion.values())), interval(list(challenger.values()))
    diff = b.mean - a.mean
    half = math.hypot(a.mean - a.low, b.mean - b.low)
    return Interval(diff, diff - half, diff + half)


def compute(impressions: list[Impression], events: list[tuple[str, str, float]], k: int = 10,
            attribution_seconds: float = 1800.0) -> list[OnlineMetrics]:
    """Online metrics per (model version, variant), largest groups first."""
    groups: dict[tuple[str, str], list[tuple[Impression, int | None]]] = defaultdict(list)
    for imp, position in attribute(impressions, events, k, attribution_seconds):
        groups[(imp.model_version, imp.variant)].append((imp, position))
    out = []
    for (version, variant), rows in groups.items():
        per_user: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        shown: set[str] = set()
        for imp, pos in rows:
            per_user[imp.user_id].append((0.0, 0.0, 0.0) if pos is None else
                                         (1.0, 1.0 / math.log2(pos + 1), 1.0 / pos))
            shown.update(imp.items[:k])
        means = [tuple(sum(v[j] for v in vals) / len(vals) for j in range(3)) for vals in per_user.values()]
        catalog = max(imp.catalog_size for imp, _ in rows)
        out.append(OnlineMetrics(
            model_version=version, variant=variant, k=k, requests=len(rows), users=len(per_user),
            hits=sum(pos is not None for _, pos in rows),
            **{name: interval([m[j] for m in means]) for j, name in enumerate(METRICS)},
            distinct_items=len(shown), coverage=len(shown) / catalog if catalog else math.nan))
    return sorted(out, key=lambda m: (-m.requests, m.variant, m.model_version))


def read(store: EventStore, since: float, until: float,
         attribution_seconds: float) -> tuple[list[Impression], list[tuple[str, str, float]]]:
    """The impressions shown in [since, until) and the events that may count for them (received
    up to `attribution_seconds` after `until`)."""
    impressions = store.impressions(since, until)
    if not impressions:
        return [], []
    return impressions, store.received(impressions[0].shown_at, until + attribution_seconds)


def from_store(store: EventStore, since: float, until: float, k: int = 10,
               attribution_seconds: float = 1800.0) -> list[OnlineMetrics]:
    """The online metrics of the impressions shown in [since, until)."""
    impressions, events = read(store, since, until, attribution_seconds)
    return compute(impressions, events, k, attribution_seconds)


def parse_time(text: str, now: float) -> float:
    """`24h`, `30m`, `7d`, `90s` (ago), an ISO date-time, or epoch seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: use 24h / 30m / 7d, an ISO date-time or epoch "
                                         "seconds") from None


def table(rows: list[OnlineMetrics]) -> str:
    if not rows:
        return "no impressions in the period"
    k = rows[0].k
    head = (f"| model version | variant | requests | users | HR@{k} [95% CI] | NDCG@{k} [95% CI] | MRR@{k} | "
            f"coverage@{k} |\n|---|---|---|---|---|---|---|---|")

    def ci(iv: Interval) -> str:
        return f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]"

    return "\n".join([head] + [f"| {m.model_version} | {m.variant} | {m.requests} | {m.users} | {ci(m.hr)} | "
                               f"{ci(m.ndcg)} | {m.mrr.mean:.4f} | {m.coverage:.4f} |" for m in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Online metrics of the lists the service showed.")
    p.add_argument("--db", type=store_arg, required=True, help="the service's event store (file or postgresql:// URL)")
    p.add_argument("--since", default="24h", help="start: 24h / 30m / 7d ago, ISO date-time or epoch seconds")
    p.add_argument("--until", default=None, help="end (default: now)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--attribution-seconds", type=float, default=1800.0)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    a = p.parse_args(argv)
    problem = not_a_store(a.db)
    if problem:
        p.error(f"--db: {problem}")
    if a.k < 1 or a.attribution_seconds <= 0:
        p.error("--k and --attribution-seconds must be positive")
    now = time.time()
    try:
        since = parse_time(a.since, now)
        until = parse_time(a.until, now) if a.until else now
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    store = EventStore(a.db)
    try:
        rows = from_store(store, since, until, a.k, a.attribution_seconds)
    finally:
        store.close()
    if a.json:
        json.dump([{**m.flat(), "distinct_items": m.distinct_items} for m in rows], sys.stdout, indent=2)
        print()
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
