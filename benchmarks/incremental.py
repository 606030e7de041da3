"""Incremental training on a time-ordered replay: no update vs an incremental update vs a full
retrain, window after window.

    python -m benchmarks.incremental --dataset movielens-100k --out i.json

The dataset's events are ordered by time; the first `--base-fraction` is the base period, the
rest is cut into `--windows` + 1 windows of equal event counts. A base model is trained on the
base period (the number of epochs chosen on its inner holdout: each user's last base event).
Then, for each window w = 1..W, every policy takes window w and is scored on window w + 1:
- no_update: the base model, new items added from their text (what the service does for
  cold-start items), user vectors from the users' current histories;
- incremental: the previous window's incremental model, extended by the new items and
  fine-tuned on the changed sequences plus a replay sample (`components.incremental`);
- full_retrain: a fresh model trained on everything up to the end of window w, as many epochs
  as the base model.
Scoring (the evaluator's protocol, full ranking): users with earlier events and at least one
event in window w + 1 on an item known by the end of window w; targets are those items, the
history (cut to max_len) is every event before window w + 1, and history items are excluded.
The drift rule's decision for each window is recorded beside it (the policies above do not follow
it, so that they stay comparable), and one window is made to drift on purpose (a block of new
items taking most of its events) to show the rule sends it to a full retrain.

`--tune` first chooses the update's settings (steps, learning rate, batch size, replay ratio:
`--tune-grid`) on the base period alone, so that no window the policies are scored on is read:
the base period is replayed in turn (its first `--base-fraction` trains an inner base model,
the rest is cut into `--tune-windows` + 1 windows), every combination updates that model window
after window, and the best pooled NDCG@10 among those whose updates stay within
`--tune-max-share` of the base model's training time is used for the replay. The trials are
recorded under "tuning"; the chosen settings belong in the dataset's preset.

Output: `{DATASET: {"windows": [...], "total": {...}, "drift_check": {...}}}` (and "tuning")
and a plot of NDCG@10 per window for the three policies beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from benchmarks.common import datasets, save, settings_by_dataset
from components import metrics
from components.cli import add_params_arguments, run_main
from components.config import IncrementalConfig, Params
from components.incremental import (
    Events, UpdateResult, decide, extend_items, incremental_update, measure_drift, rank_users, train_steps,
)

if TYPE_CHECKING:
    from components.bert.model import SeqRecModel

log = logging.getLogger("benchmarks.incremental")

K = 10
POLICIES = ("no_update", "incremental", "full_retrain")


# --------------------------------------------------------------------------------------------
# Data: events in time order, ids indexed by first appearance
# --------------------------------------------------------------------------------------------


# Length of the pseudo-period a position replay spreads every user's history over.
POSITION_SPAN_SECONDS = 365 * 86400


def load_events(params: Params, order: str = "time") -> tuple[Events, list[str]]:
    """Every event, in replay order, with users and items indexed by first appearance (so the
    items known at any moment are a prefix of the index), and the items' texts.

    `order="time"` replays the events' timestamps. `order="position"` is for data without them:
    every user's history is spread evenly over one pseudo-year (event k of n at k/n of it), so
    each window holds the next part of every user's history. It assumes all histories span the
    same period, which real data does not: an approximation, labelled as such in the results."""
    import polars as pl

    from components.datasets import load_dataset, normalize

    if order == "time" and params.data.source == "unisrec":
        # Their order is written as consecutive seconds from one date for every user: sorting
        # by it would interleave users by position, not replay time.
        raise ValueError("UniSRec files (amazon-scientific) carry no timestamps: no time-ordered replay is possible "
                         "(--order position replays each user's history spread over one pseudo-period instead)")
    inter, items = normalize(load_dataset(params.data, params.seed))
    inter = inter.with_row_index("order")
    if order == "position":
        start = int(inter["timestamp"].min())
        inter = inter.sort(["timestamp", "order"]).with_columns(
            pl.int_range(pl.len()).over("user_id").alias("k"), pl.len().over("user_id").alias("n"))
        inter = inter.with_columns(
            timestamp=(start + pl.col("k") * POSITION_SPAN_SECONDS // pl.col("n")).cast(pl.Int64)).drop("k", "n")
    elif order != "time":
        raise ValueError(f"order must be 'time' or 'position', not {order!r}")
    inter = inter.sort(["timestamp", "order"])
    def first_seen(col: str) -> pl.DataFrame:
        return inter.select(col).unique(maintain_order=True).with_row_index(f"{col}_idx")

    users, item_ids = first_seen("user_id"), first_seen("item_id")
    inter = inter.join(users, on="user_id").join(item_ids, on="item_id").sort(["timestamp", "order"])
    texts = item_ids.join(items, on="item_id", how="left").sort("item_id_idx")["text"].fill_null("").to_list()
    return Events(inter["user_id_idx"].to_numpy().astype(np.int64), inter["item_id_idx"].to_numpy().astype(np.int64),
                  inter["timestamp"].to_numpy().astype(np.int64)), texts


def item_text_embeddings(texts: list[str], params: Params, work: Path):
    """The pipeline's own text-embedding stage (and its cache) over the items in index order."""
    import polars as pl

    from components.bert.text_embeddings import embed_item_texts

    features = work / "features"
    features.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_idx": np.arange(len(texts)), "text": texts}).write_parquet(features / "items.parquet")
    embed_item_texts(features, work / "text", params.bert.text_encoder)
    return np.load(work / "text" / "embeddings.npy")


def subset(ev: Events, lo: int, hi: int) -> Events:
    return Events(ev.users[lo:hi], ev.items[lo:hi], ev.timestamps[lo:hi])


def sequences(ev: Events, n_users: int) -> list[np.ndarray]:
    """Each user's items in time order (events are in time order already)."""
    order = np.argsort(ev.users, kind="stable")
    bounds = np.searchsorted(ev.users[order], np.arange(n_users + 1))
    items = ev.items[order]
    return [items[bounds[u]:bounds[u + 1]] for u in range(n_users)]


# --------------------------------------------------------------------------------------------
# Models and scoring
# --------------------------------------------------------------------------------------------


def new_model(params: Params, n_items: int, text: np.ndarray | None):
    import torch

    from components.bert.model import SeqRecModel
    from components.bert.train import model_config

    mcfg = model_config(params.bert, n_items, text.shape[1] if text is not None else 0, inference="causal")
    torch.manual_seed(params.seed)
    return SeqRecModel(mcfg, text_features=torch.as_tensor(text[:n_items]) if "text" in mcfg.mode else None)


def score(model, histories: list[np.ndarray], targets: sp.csr_matrix, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@K and Recall@K, full ranking over the model's `n_items`, history excluded."""
    rows = np.repeat(np.arange(len(histories)), [h.size for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    exclude = sp.csr_matrix((np.ones(cols.size, np.float32), (rows, cols)), shape=(len(histories), n_items))
    return rank_users(model, histories, exclude, targets, K)


def eval_set(ev: Events, until: int, window: slice, n_known: int, n_users: int):
    """Histories (events before `window`) and targets (its events on known items) of the users
    who have both."""
    before = sequences(subset(ev, 0, until), n_users)
    w = subset(ev, window.start, window.stop)
    keep = w.items < n_known
    users_w, items_w = w.users[keep], w.items[keep]
    users = np.array(sorted({int(u) for u in users_w if before[u].size}), dtype=np.int64)
    row = {u: r for r, u in enumerate(users)}
    pick = np.array([u in row for u in users_w], dtype=bool)
    targets = sp.csr_matrix((np.ones(int(pick.sum()), np.float32),
                             ([row[int(u)] for u in users_w[pick]], items_w[pick])), shape=(users.size, n_known))
    targets.data[:] = 1.0  # repeated events on an item are one target
    return [before[u] for u in users], targets, users


def train_full(params: Params, ev: Events, n_items: int, text, epochs: int, seed: int,
               after=None, every: int = 0):
    """A model trained from scratch on `ev` for `epochs` epochs (the fine-tuning stage's
    learning rate and batch size)."""
    model = new_model(params, n_items, text)
    seqs = [s for s in sequences(ev, int(ev.users.max()) + 1) if s.size >= 2]
    per_epoch = math.ceil(len(seqs) / params.bert.batch_size)
    counts = np.bincount(ev.items, minlength=n_items)
    train_steps(model, seqs, epochs * per_epoch, params.bert.finetune.lr, params.bert.batch_size, params.bert, seed,
                item_counts=counts, every=per_epoch if after else 0,
                after=(lambda step: after(model, step // per_epoch)) if after else None)
    return model


def choose_epochs(params: Params, base: Events, n_items: int, text) -> tuple[int, list[float]]:
    """Epochs for a full training, chosen on the base period's inner holdout (each user's last
    base event, scored with the rest as history) with the fine-tuning stage's patience."""
    n_users = int(base.users.max()) + 1
    last = np.zeros(len(base), dtype=bool)
    seen: set[int] = set()
    for i in range(len(base) - 1, -1, -1):
        u = int(base.users[i])
        if u not in seen:
            seen.add(u)
            last[i] = True
    train = Events(base.users[~last], base.items[~last], base.timestamps[~last])
    hist = sequences(train, n_users)
    users = np.array([u for u in range(n_users) if hist[u].size], dtype=np.int64)
    held = dict(zip(base.users[last].tolist(), base.items[last].tolist()))
    targets = sp.csr_matrix((np.ones(users.size, np.float32), (np.arange(users.size), [held[u] for u in users])),
                            shape=(users.size, n_items))
    curve: list[float] = []
    patience = params.bert.finetune.patience

    class Stop(Exception):
        pass

    def after(model, epoch: int) -> None:
        curve.append(float(score(model, [hist[u] for u in users], targets, n_items)[0].mean()))
        log.info("base model, epoch %d: inner-holdout NDCG@10 %.4f", epoch, curve[-1])
        if len(curve) - 1 - int(np.argmax(curve)) >= patience:
            raise Stop

    try:
        train_full(params, train, n_items, text, params.bert.finetune.max_epochs, params.seed, after=after, every=1)
    except Stop:
        pass
    return int(np.argmax(curve)) + 1, curve


def drifted_window(ev: Events, window: slice, n_known: int, share: float, seed: int) -> tuple[Events, int]:
    """Window `window` with `share` of its events moved onto a block of brand-new items."""
    w = subset(ev, window.start, window.stop)
    rng = np.random.default_rng(seed)
    moved = rng.random(len(w)) < share
    block = max(10, len(w) // 50)
    items = w.items.copy()
    items[moved] = n_known + rng.integers(0, block, int(moved.sum()))
    return Events(w.users, items, w.timestamps), n_known + block


# --------------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------------


def extend(model: SeqRecModel, n_known: int, text: np.ndarray | None) -> SeqRecModel:
    """A copy of `model` over the first `n_known` items, the new ones from their text."""
    return extend_items(model, n_known, text[model.cfg.n_items:n_known] if text is not None else None)


def update_on(model: SeqRecModel, ev: Events, window: slice, n_known: int, text: np.ndarray | None, n_users: int,
              cfg: IncrementalConfig, params: Params, seed: int) -> tuple[SeqRecModel, UpdateResult]:
    """A copy of `model` extended to the `n_known` items and updated on `window`: fine-tuned on
    the sequences so far of the users with events in it, plus a replay sample of the others'.
    Returns the model and the update's record."""
    model = extend(model, n_known, text)
    so_far = sequences(subset(ev, 0, window.stop), n_users)
    changed = sorted(set(ev.users[window].tolist()))
    changed_set = set(changed)
    others = [so_far[u] for u in range(n_users) if u not in changed_set and so_far[u].size >= 2]
    update = incremental_update(model, [so_far[u] for u in changed], others, cfg, params.bert, seed,
                                item_counts=np.bincount(ev.items[:window.stop], minlength=n_known))
    return model, update


# --------------------------------------------------------------------------------------------
# Tuning the update on the base period alone
# --------------------------------------------------------------------------------------------


# The update settings `--tune` may search, with their types.
TUNABLE = {"steps": int, "lr": float, "batch_size": int, "replay_ratio": float}
# What `--tune` searches unless `--tune-grid` says otherwise: around the committed settings (60
# steps at 5e-4, one replayed sequence per changed one), a longer update, a rate as low as the
# end of a full training's schedule (a tenth of 1e-3) and a higher one, more replay.
DEFAULT_GRID = "steps=60,300 lr=0.0001,0.0005,0.002 replay_ratio=1,4"


class TuningError(RuntimeError):
    exit_code = 1  # a CLI prints the message and exits with this, no traceback


@dataclass(frozen=True)
class TuneSpec:
    grid: dict[str, tuple]
    windows: int
    # An update may take at most this share of the base model's training time.
    max_share: float


def parse_grid(text: str) -> dict[str, tuple]:
    """`"steps=60,300 lr=0.0005,0.002"` -> {"steps": (60, 300), "lr": (0.0005, 0.002)}."""
    grid: dict[str, tuple] = {}
    for part in text.replace(";", " ").split():
        key, sep, values = part.partition("=")
        if not sep or key not in TUNABLE:
            raise ValueError(f"tune grid entry {part!r}: expected KEY=V1,V2,... with KEY one of {', '.join(TUNABLE)}")
        try:
            grid[key] = tuple(TUNABLE[key](v) for v in values.split(",") if v)
        except ValueError:
            raise ValueError(f"tune grid entry {part!r}: values must be {TUNABLE[key].__name__}s") from None
        if not grid[key] or any(v <= 0 for v in grid[key]):
            raise ValueError(f"tune grid entry {part!r}: give one or more positive values")
    if not grid:
        raise ValueError("the tune grid is empty")
    return grid


def tune_update(params: Params, ev: Events, text: np.ndarray | None, base_end: int, base_fraction: float,
                epochs: int, n_users: int, known_at: np.ndarray, spec: TuneSpec, max_seconds: float) -> dict[str, Any]:
    """The update's settings chosen on the base period alone (the replay's windows are never
    read): the base period is itself replayed, its first `base_fraction` training an inner base
    model (as many epochs as the replay's), the rest cut into `spec.windows` + 1 windows. Every
    combination in `spec.grid` updates a copy of the inner base model window after window, scored
    on the next window as in the replay. The best pooled NDCG@10 among the combinations whose mean
    update took at most `max_seconds` wins (ties: the first in grid order). The budget is wall
    time, measured here: on a machine busy with other work the choice can change."""
    inner_end = int(base_end * base_fraction)
    if inner_end < 1 or base_end - inner_end < spec.windows + 1:
        raise TuningError(f"the base period ({base_end} events) is too small for an inner replay of "
                          f"{spec.windows} windows")
    bounds = np.linspace(inner_end, base_end, spec.windows + 2).astype(int)
    windows = [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(spec.windows + 1)]
    inner_model = train_full(params, subset(ev, 0, inner_end), int(known_at[inner_end - 1]), text, epochs, params.seed)
    known = [int(known_at[windows[w].stop - 1]) for w in range(spec.windows)]
    evals = [eval_set(ev, windows[w + 1].start, windows[w + 1], known[w], n_users) for w in range(spec.windows)]
    stale = np.concatenate([score(extend(inner_model, known[w], text), h, t, known[w])[0]
                            for w, (h, t, _) in enumerate(evals)])
    if stale.size == 0:
        raise TuningError("no user of the inner replay's windows can be scored (none has earlier events)")
    trials: list[dict[str, Any]] = []
    combos = list(itertools.product(*spec.grid.values()))
    for i, values in enumerate(combos):
        settings = dict(zip(spec.grid, values))
        cfg = dataclasses.replace(params.incremental, **settings)
        model, ndcg, recall, seconds = inner_model, [], [], []
        for w, (histories, targets, _) in enumerate(evals):
            model, update = update_on(model, ev, windows[w], known[w], text, n_users, cfg, params, params.seed + w)
            n, r = score(model, histories, targets, known[w])
            ndcg.append(n)
            recall.append(r)
            seconds.append(update.seconds)
        trial = {"settings": settings, "ndcg@10": float(np.concatenate(ndcg).mean()),
                 "recall@10": float(np.concatenate(recall).mean()), "seconds_per_update": float(np.mean(seconds))}
        trial["within_budget"] = trial["seconds_per_update"] <= max_seconds
        trials.append(trial)
        log.info("tuning %d/%d %s: inner NDCG@10 %.4f (no update %.4f), %.1f s per update%s", i + 1, len(combos),
                 settings, trial["ndcg@10"], stale.mean(), trial["seconds_per_update"],
                 "" if trial["within_budget"] else f" (over the {max_seconds:.1f} s budget)")
    allowed = [t for t in trials if t["within_budget"]]
    if not allowed:
        raise TuningError(f"no update settings in the grid took at most {max_seconds:.1f} s per update: "
                          "give --tune-grid cheaper settings or a larger --tune-max-share")
    best = max(allowed, key=lambda t: t["ndcg@10"])  # max keeps the first of equals
    log.info("tuning chose %s", best["settings"])
    return {"inner_events": inner_end, "base_events": base_end, "window_bounds": bounds.tolist(),
            "windows": spec.windows, "epochs": epochs,
            "max_seconds_per_update": max_seconds, "scored_users": int(stale.size),
            "no_update_ndcg@10": float(stale.mean()), "trials": trials, "chosen": best["settings"]}


def run_dataset(params: Params, work: Path, base_fraction: float, n_windows: int,
                order: str = "time", tune: TuneSpec | None = None) -> dict[str, Any]:
    ev, texts = load_events(params, order)
    n = len(ev)
    n_users = int(ev.users.max()) + 1
    text = item_text_embeddings(texts, params, work) if "text" in params.bert.mode else None
    base_end = int(n * base_fraction)
    bounds = np.linspace(base_end, n, n_windows + 2).astype(int)
    windows = [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(n_windows + 1)]
    known_at = np.maximum.accumulate(ev.items) + 1  # items known after event i (first-appearance index)

    base = subset(ev, 0, base_end)
    n_base_items = int(known_at[base_end - 1])
    epochs, curve = choose_epochs(params, base, n_base_items, text)
    log.info("full training: %d epochs (inner holdout)", epochs)
    start = time.perf_counter()
    base_model = train_full(params, base, n_base_items, text, epochs, params.seed)
    base_seconds = time.perf_counter() - start

    cfg = params.incremental
    tuning = None
    if tune is not None:
        tuning = tune_update(params, ev, text, base_end, base_fraction, epochs, n_users, known_at, tune,
                             max_seconds=tune.max_share * base_seconds)
        cfg = dataclasses.replace(cfg, **tuning["chosen"])
    incremental = base_model
    trained_on = base  # the events the incremental model has seen (the drift reference)
    rows: list[dict[str, Any]] = []
    per_user: dict[str, list[np.ndarray]] = {p: [] for p in POLICIES}
    updates_since_full = 0
    for w in range(n_windows):
        current, following = windows[w], windows[w + 1]
        n_known = int(known_at[current.stop - 1])
        window_events = subset(ev, current.start, current.stop)
        drift = measure_drift(trained_on, window_events, incremental.cfg.n_items, seed=params.seed + w)
        decision = decide(drift, updates_since_full, cfg)
        updates_since_full += 1  # this policy never retrains in full (see the module docstring)

        histories, targets, users = eval_set(ev, following.start, following, n_known, n_users)
        row: dict[str, Any] = {"window": w + 1, "events": len(window_events), "eval_users": int(users.size),
                               "new_items": n_known - incremental.cfg.n_items, "decision": decision.action,
                               "reason": decision.reason, "drift": drift.metrics()}

        scores = {"no_update": score(extend(base_model, n_known, text), histories, targets, n_known)}
        incremental, update = update_on(incremental, ev, current, n_known, text, n_users, cfg, params,
                                        params.seed + w)
        scores["incremental"] = score(incremental, histories, targets, n_known)

        start = time.perf_counter()
        full = train_full(params, subset(ev, 0, current.stop), n_known, text, epochs, params.seed)
        full_seconds = time.perf_counter() - start
        scores["full_retrain"] = score(full, histories, targets, n_known)

        for p in POLICIES:
            ndcg, recall = scores[p]
            row[p] = {"ndcg@10": float(ndcg.mean()) if ndcg.size else math.nan,
                      "recall@10": float(recall.mean()) if recall.size else math.nan}
            per_user[p].append(np.stack([ndcg, recall]))
        row["incremental"]["seconds"] = update.seconds
        row["incremental"]["update"] = update.metrics()
        row["full_retrain"]["seconds"] = full_seconds
        rows.append(row)
        trained_on = subset(ev, 0, current.stop)
        log.info("window %d/%d: %d events, %d users scored; NDCG@10 no update %.4f, incremental %.4f (%.1f s), "
                 "full retrain %.4f (%.1f s); drift rule: %s", w + 1, n_windows, len(window_events), users.size,
                 row["no_update"]["ndcg@10"], row["incremental"]["ndcg@10"], update.seconds,
                 row["full_retrain"]["ndcg@10"], full_seconds, decision.action)

    pooled = {p: np.concatenate(per_user[p], axis=1) for p in POLICIES}
    total: dict[str, Any] = {p: {"ndcg@10": float(pooled[p][0].mean()), "recall@10": float(pooled[p][1].mean())}
                             for p in POLICIES}
    total["incremental"]["seconds_per_update"] = float(np.mean([r["incremental"]["seconds"] for r in rows]))
    total["full_retrain"]["seconds_per_update"] = float(np.mean([r["full_retrain"]["seconds"] for r in rows]))
    total["scored_users"] = int(pooled["incremental"].shape[1])
    ratio, low, high = metrics.paired_bootstrap_ratio(pooled["incremental"][0], pooled["no_update"][0], seed=params.seed)
    total["incremental_over_no_update"] = {"ndcg@10_ratio": ratio, "ci95": [low, high]}
    ratio, low, high = metrics.paired_bootstrap_ratio(pooled["incremental"][0], pooled["full_retrain"][0],
                                                      seed=params.seed)
    total["incremental_over_full_retrain"] = {"ndcg@10_ratio": ratio, "ci95": [low, high]}
    total["update_seconds_over_full_retrain"] = (total["incremental"]["seconds_per_update"]
                                                 / total["full_retrain"]["seconds_per_update"])

    # A window made to drift: 80 % of window 1's events moved onto a block of new items.
    drifted, n_drift_items = drifted_window(ev, windows[0], int(known_at[windows[0].stop - 1]), 0.8, params.seed)
    drift = measure_drift(base, drifted, n_base_items, seed=params.seed)
    decision = decide(drift, 0, cfg)
    return {
        "settings": {"order": order, "base_fraction": base_fraction, "windows": n_windows, "events": n, "users": n_users,
                     "items": int(known_at[-1]), "full_training_epochs": epochs, "inner_holdout_curve": curve,
                     "base_training_seconds": base_seconds, "incremental": dict(vars(cfg)),
                     "bert": {k: getattr(params.bert, k) for k in ("mode", "max_len", "hidden_size", "num_layers",
                                                                    "batch_size", "loss")}},
        **({"tuning": tuning} if tuning is not None else {}),
        "windows": rows, "total": total,
        "drift_check": {"moved_share": 0.8, "new_items": n_drift_items - int(known_at[windows[0].stop - 1]),
                        "drift": drift.metrics(), "decision": decision.action, "reason": decision.reason},
    }


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d for d in out if isinstance(out[d], dict) and "windows" in out[d]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = out[name]["windows"]
        x = [r["window"] for r in rows]
        for p in POLICIES:
            ax.plot(x, [r[p]["ndcg@10"] for r in rows], marker="o", label=p.replace("_", " "))
        for r in rows:
            if r["decision"] == "full_retrain":
                ax.axvline(r["window"], color="grey", alpha=0.2)
        ax.set(title=f"{name}: NDCG@10 on the next window", xlabel="window (updated on it)", ylabel="NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--dataset", default="movielens-100k", help=f"comma-separated: {', '.join(datasets())}")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (one dataset only)")
    parser.add_argument("--base-fraction", type=float, default=0.7)
    parser.add_argument("--windows", type=int, default=10, help="windows updated on (each scored on the next)")
    parser.add_argument("--order", choices=["time", "position"], default="time",
                        help="replay by timestamp, or (data without timestamps) by each user's relative position")
    parser.add_argument("--tune", action="store_true",
                        help="choose the update's settings on the base period first (its own inner replay) "
                             "and run the replay with them")
    parser.add_argument("--tune-grid", default=DEFAULT_GRID,
                        help=f"settings --tune searches, every combination (default: {DEFAULT_GRID!r})")
    parser.add_argument("--tune-windows", type=int, default=5, help="windows of the inner replay")
    parser.add_argument("--tune-max-share", type=float, default=0.2,
                        help="the most an update may take, as a share of the base model's training time")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0 < args.base_fraction < 1 or args.windows < 1:
        parser.error("--base-fraction must be in (0, 1) and --windows at least 1")
    tune = None
    if args.tune:
        if args.tune_windows < 1 or not args.tune_max_share > 0:
            parser.error("--tune-windows must be at least 1 and --tune-max-share above 0")
        try:
            tune = TuneSpec(parse_grid(args.tune_grid), args.tune_windows, args.tune_max_share)
        except ValueError as e:
            parser.error(str(e))
    settings = settings_by_dataset(parser, args)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in settings.items():
            out[name] = run_dataset(params, (args.workdir or Path(tmp)) / name, args.base_fraction, args.windows,
                                    args.order, tune)
            total = out[name]["total"]
            print(f"{name}: NDCG@10 no update {total['no_update']['ndcg@10']:.4f}, incremental "
                  f"{total['incremental']['ndcg@10']:.4f}, full retrain {total['full_retrain']['ndcg@10']:.4f}; "
                  f"update {total['update_seconds_over_full_retrain']:.1%} of a full retrain's time; "
                  f"drifted window -> {out[name]['drift_check']['decision']}"
                  + (f"; tuned update settings {out[name]['tuning']['chosen']}" if tune else ""))
            save(out, args.out, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
