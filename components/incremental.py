"""Incremental updates from new events: how far a window of new events drifted from the data the
champion was trained on, what to do about it (nothing, an incremental update, a full retrain),
and the update itself: the champion's weights fine-tuned on the sequences that changed, with new
items' vectors from their text and a replay sample of older sequences against forgetting.

Items and users are integer indices. A window's items at or above the champion's `n_items` are
items it has never seen; `extend_items` gives the model rows for them (their text through the
model's own projection, and whitening, in text modes; a zero id vector, learnt by the update).

Drift (`measure_drift`), all between the champion's training events and the window:
- popularity divergence: Jensen-Shannon (base 2, 0..1) between the item distributions, minus
  what a window of the same size drawn from the training distribution itself scores (a small
  window is far from any distribution by chance alone: 50 events over 2,000 items score ~0.7);
- unseen item share: events on items the champion has never seen;
- event rate ratio: events per hour in the window over the training data's;
- history length ratio: the window's users' earlier events, on average, over the training
  users' (new users flooding in push it towards 0).
`decide` turns that, the window's size and the updates since the last full retrain into an
action with its reason, by the thresholds of the `incremental` params section.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.bert.data import NextItemCollate
from components.bert.model import SeqRecModel
from components.config import BertRecConfig, IncrementalConfig, MFConfig

log = logging.getLogger(__name__)

NOTHING, INCREMENTAL, FULL = "nothing", "incremental", "full_retrain"


@dataclass(frozen=True)
class Events:
    """Events as parallel arrays (user index, item index, unix seconds)."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return int(self.items.size)

    @property
    def hours(self) -> float:
        if self.timestamps.size == 0:
            return 0.0
        return max(float(self.timestamps.max() - self.timestamps.min()), 1.0) / 3600.0


@dataclass(frozen=True)
class Drift:
    events: int
    users: int
    new_users: int
    popularity_divergence: float
    # What a same-sized sample of the training distribution scores (the noise floor above).
    popularity_divergence_noise: float
    unseen_item_share: float
    event_rate_ratio: float
    history_length_ratio: float

    @property
    def popularity_divergence_excess(self) -> float:
        return max(0.0, self.popularity_divergence - self.popularity_divergence_noise)

    def metrics(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "popularity_divergence_excess": self.popularity_divergence_excess}


@dataclass(frozen=True)
class Decision:
    action: str  # NOTHING | INCREMENTAL | FULL
    reason: str


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2) of two count vectors of the same length."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(1.0, max(0.0, (kl(p) + kl(q)) / 2))


def measure_drift(trained: Events, window: Events, n_known_items: int, seed: int = 0) -> Drift:
    """The window's drift from the events the model was trained on (see the module docstring)."""
    n = max(int(trained.items.max(initial=-1)), int(window.items.max(initial=-1)), n_known_items - 1) + 1
    base = np.bincount(trained.items, minlength=n)
    new = np.bincount(window.items, minlength=n)
    divergence = js_divergence(base, new)
    # The noise floor: a window of the same size drawn from the training distribution.
    noise = 0.0
    if len(window) and base.sum() > 0:
        sample = np.random.default_rng(seed).multinomial(len(window), base / base.sum())
        noise = js_divergence(base, sample)
    unseen = float(np.mean(window.items >= n_known_items)) if len(window) else 0.0
    rate_base = len(trained) / trained.hours if len(trained) else 0.0
    rate = len(window) / window.hours if len(window) else 0.0
    known_counts = np.bincount(trained.users)
    active = np.unique(window.users)
    earlier = np.where(active < known_counts.size, known_counts[np.minimum(active, known_counts.size - 1)], 0)
    mean_base = float(known_counts[known_counts > 0].mean()) if known_counts.size else 0.0
    return Drift(
        events=len(window), users=int(active.size), new_users=int(np.sum(earlier == 0)),
        popularity_divergence=divergence, popularity_divergence_noise=noise, unseen_item_share=unseen,
        event_rate_ratio=rate / rate_base if rate_base > 0 else math.inf,
        history_length_ratio=float(earlier.mean()) / mean_base if active.size and mean_base > 0 else 0.0,
    )


def decide(drift: Drift, updates_since_full: int, cfg: IncrementalConfig) -> Decision:
    """Nothing (too few events), a full retrain (drift past a threshold, or too many updates in
    a row) or an incremental update; the reason names the figure that decided."""
    if drift.events < cfg.min_events:
        return Decision(NOTHING, f"{drift.events} new events, fewer than incremental.min_events={cfg.min_events}")
    over = []
    if drift.popularity_divergence_excess > cfg.popularity_divergence:
        over.append(f"item popularity diverged by {drift.popularity_divergence_excess:.3f} beyond sampling noise "
                    f"(> incremental.popularity_divergence={cfg.popularity_divergence:g})")
    if drift.unseen_item_share > cfg.unseen_item_share:
        over.append(f"{drift.unseen_item_share:.1%} of the events are on items the model has never seen "
                    f"(> incremental.unseen_item_share={cfg.unseen_item_share:g})")
    ratio = cfg.event_rate_ratio
    if ratio is not None and not (1 / ratio <= drift.event_rate_ratio <= ratio):
        over.append(f"the event rate changed {drift.event_rate_ratio:.2f}x (outside 1/{ratio:g}..{ratio:g}, "
                    "incremental.event_rate_ratio)")
    if over:
        return Decision(FULL, "; ".join(over))
    if updates_since_full >= cfg.max_updates_between_full:
        return Decision(FULL, f"{updates_since_full} incremental updates since the last full retrain "
                              f"(incremental.max_updates_between_full={cfg.max_updates_between_full})")
    return Decision(INCREMENTAL, f"{drift.events} new events from {drift.users} users, drift within the thresholds "
                                 f"(popularity {drift.popularity_divergence_excess:.3f} beyond noise, "
                                 f"{drift.unseen_item_share:.1%} on unseen items)")


def window_drift(features_dir: Path, window_file: Path, seed: int = 0) -> Drift:
    """`measure_drift` of a window of events by id (`window_file`: user_id, item_id, timestamp)
    against the training split of the features the champion was trained on."""
    import polars as pl

    trained = pl.read_parquet(features_dir / "interactions.parquet").filter(pl.col("split") == "train")
    items = pl.read_parquet(features_dir / "items.parquet").select("item_id", pl.col("item_idx").cast(pl.Int64))
    users = pl.read_parquet(features_dir / "user_map.parquet").select("user_id", pl.col("user_idx").cast(pl.Int64))
    window = pl.read_parquet(window_file).select(pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8),
                                                 "timestamp")
    window = window.join(items, on="item_id", how="left").join(users, on="user_id", how="left")
    # Unseen items and users get indices past the champion's, one per id.
    for col, known in (("item", items.height), ("user", users.height)):
        new = window.filter(pl.col(f"{col}_idx").is_null())[f"{col}_id"].unique(maintain_order=True).to_list()
        window = window.with_columns(pl.col(f"{col}_idx").fill_null(pl.col(f"{col}_id").replace_strict(
            {i: known + k for k, i in enumerate(new)}, default=None, return_dtype=pl.Int64)))

    def events(df: pl.DataFrame) -> Events:
        return Events(df["user_idx"].to_numpy().astype(np.int64), df["item_idx"].to_numpy().astype(np.int64),
                      df["timestamp"].to_numpy().astype(np.int64))

    return measure_drift(events(trained), events(window), items.height, seed=seed)


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


def carry_items(model: SeqRecModel, old_index: np.ndarray, text: np.ndarray | None = None) -> SeqRecModel:
    """A copy of `model` over a new catalogue: item j of the new catalogue is item
    `old_index[j]` of the model's, or new when that is -1. Known items keep their id vectors, new
    ones get a zero id vector; in text modes every item's text embedding comes from `text` (the
    new catalogue's, row per item), through the champion's projection and whitening, as for
    cold-start items."""
    old_index = np.asarray(old_index, dtype=np.int64)
    n_items, old = int(old_index.size), model.cfg.n_items
    if old_index.max(initial=-1) >= old or old_index.min(initial=0) < -1:
        raise ValueError(f"old_index must hold indices below {old} (or -1 for new items)")
    if model.cfg.text_finetune_layers > 0:
        raise ValueError("a model that fine-tunes its text encoder holds tokenized item texts; "
                         "a new catalogue needs a full retrain")
    state = model.state_dict()
    carried = SeqRecModel(dataclasses.replace(model.cfg, n_items=n_items))
    known = torch.as_tensor(old_index >= 0)
    source = torch.as_tensor(np.maximum(old_index, 0))
    if "id" in model.cfg.mode:
        state["id_embedding.weight"] = torch.where(known[:, None], state["id_embedding.weight"][source], 0.0)
    if "text" in model.cfg.mode:
        if text is None or text.shape != (n_items, model.cfg.text_dim):
            raise ValueError(f"the new catalogue needs text embeddings of shape {(n_items, model.cfg.text_dim)}")
        state["text_features"] = torch.as_tensor(text, dtype=torch.float32)
    carried.load_state_dict(state)
    return carried.eval()


def extend_items(model: SeqRecModel, n_items: int, new_text: np.ndarray | None = None) -> SeqRecModel:
    """`carry_items` for a catalogue that only grew: items past the model's are new, with their
    text embeddings in `new_text` (one row per new item; text modes)."""
    old = model.cfg.n_items
    if n_items < old:
        raise ValueError(f"cannot shrink the catalogue from {old} to {n_items} items")
    index = np.concatenate([np.arange(old), np.full(n_items - old, -1)])
    text = None
    if "text" in model.cfg.mode:
        rows = np.zeros((0, model.cfg.text_dim), np.float32) if new_text is None else np.asarray(new_text)
        if rows.shape != (n_items - old, model.cfg.text_dim):
            raise ValueError(f"new items need text embeddings of shape {(n_items - old, model.cfg.text_dim)}")
        text = np.concatenate([model.text_features.numpy(), rows])
    return carry_items(model, index, text)


@dataclass(frozen=True)
class UpdateResult:
    steps: int
    changed_sequences: int
    replayed_sequences: int
    seconds: float
    final_loss: float

    def metrics(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def train_steps(model: SeqRecModel, sequences: list[np.ndarray], steps: int, lr: float, batch_size: int,
                bert: BertRecConfig, seed: int, item_counts: np.ndarray | None = None,
                every: int = 0, after: Callable[[int], None] | None = None) -> float:
    """`steps` AdamW steps of next-item training over `sequences` (chronological item indices,
    shuffled, epoch after epoch), with the training stage's loss, weight decay, clipping and a
    linear decay to a tenth of `lr`; in place. `after(step)` is called every `every` steps (the
    model in eval mode meanwhile). Returns the mean loss of the last tenth."""
    from components.bert.module import SeqRecModule
    from components.bert.train import loss_settings

    if not sequences or steps <= 0:
        return float("nan")
    # The training stage's loss (full or sampled softmax), around the model being updated.
    # (Its own network is replaced by `model` at once: no text tower is loaded for it.)
    module = SeqRecModule(
        dataclasses.asdict(dataclasses.replace(model.cfg, text_finetune_layers=0, text_encoder_path=None)),
        objective="next", lr=lr, warmup_fraction=0.0, item_counts=item_counts, **loss_settings(bert))
    module.model = model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": module.hparams.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1.0 - 0.9 * s / max(1, steps)))
    collate = NextItemCollate(model.cfg.max_len)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    # Sequences of one item have no next item to predict.
    usable = [s[-(model.cfg.max_len + 1):] for s in sequences if len(s) >= 2]
    if not usable:
        return float("nan")
    losses: list[float] = []
    order: list[int] = []
    for step in range(steps):
        if len(order) < min(batch_size, len(usable)):
            order += rng.permutation(len(usable)).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        loss = module._loss(*collate([usable[i] for i in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if bert.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, bert.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if after is not None and every and (step + 1) % every == 0:
            model.eval()
            after(step + 1)
            model.train()
    model.eval()
    return float(np.mean(losses[-max(1, steps // 10):]))


def incremental_update(model: SeqRecModel, changed: list[np.ndarray], others: list[np.ndarray],
                       cfg: IncrementalConfig, bert: BertRecConfig, seed: int,
                       item_counts: np.ndarray | None = None) -> UpdateResult:
    """Fine-tune `model` in place on the changed users' sequences (as the caller cuts them) and
    `replay_ratio` times as many sequences drawn from `others`."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_replay = min(len(others), int(round(cfg.replay_ratio * len(changed))))
    replay = [others[i] for i in rng.choice(len(others), n_replay, replace=False)] if n_replay else []
    loss = train_steps(model, changed + replay, cfg.steps, cfg.lr, cfg.batch_size, bert, seed, item_counts)
    seconds = time.perf_counter() - start
    log.info("incremental update: %d changed and %d replayed sequences, %d steps, loss %.4f, %.1f s",
             len(changed), len(replay), cfg.steps, loss, seconds)
    return UpdateResult(cfg.steps, len(changed), len(replay), seconds, loss)


def rank_users(model: SeqRecModel, histories: list[np.ndarray], exclude, targets, k: int = 10
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@k and Recall@k of `model`: user vectors from `histories`, full ranking over
    every item, `exclude` (users x items) left out, `targets` (users x items) to find."""
    from components import metrics
    from components.bert.train import user_vectors
    from components.evaluate import rank

    with torch.no_grad():
        items = model.output_items(model.item_representations()).float().numpy()
    topk = rank(user_vectors(model, [h[-model.cfg.max_len:] for h in histories]), items, exclude, k, 1024)
    hit = metrics.hits(topk, targets)
    n_targets = np.diff(targets.indptr)
    return metrics.ndcg_at_k(hit, n_targets, k), metrics.recall_at_k(hit, n_targets, k)


# --------------------------------------------------------------------------------------------
# The component: the champion's sequence model updated over new features
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertUpdateResult:
    out_dir: Path
    # The deployable network's update, and the selected (validation) network's.
    update: UpdateResult
    selected_update: UpdateResult
    carried_items: int
    new_items: int
    window_users: int
    # The window's users' newest events (the test split), full ranking: the champion's weights
    # over the new catalogue, and the updated ones.
    window_scored_users: int
    champion_window_ndcg10: float
    updated_window_ndcg10: float
    champion_window_recall10: float
    updated_window_recall10: float

    def metrics(self) -> dict[str, float]:
        return {**self.update.metrics(), "selected_seconds": self.selected_update.seconds,
                "carried_items": self.carried_items, "new_items": self.new_items,
                "window_users": self.window_users, "window_scored_users": self.window_scored_users,
                "champion_window_ndcg10": self.champion_window_ndcg10,
                "updated_window_ndcg10": self.updated_window_ndcg10,
                "champion_window_recall10": self.champion_window_recall10,
                "updated_window_recall10": self.updated_window_recall10}

    def describe(self) -> str:
        u = self.update
        return (f"update_bert: {u.changed_sequences} changed + {u.replayed_sequences} replayed sequences, "
                f"{u.steps} steps in {u.seconds:.1f} s (and {self.selected_update.seconds:.1f} s for the validation "
                f"copy); {self.new_items} new items; on the newest events of {self.window_scored_users} window users "
                f"NDCG@10 {self.champion_window_ndcg10:.4f} (champion) -> {self.updated_window_ndcg10:.4f} (updated) "
                f"-> {self.out_dir}")


def update_bert(features_dir: Path, text_dir: Path, champion_dir: Path, window_file: Path, out_dir: Path,
                epochs_file: Path, cfg: IncrementalConfig, bert: BertRecConfig, seed: int) -> BertUpdateResult:
    """The champion's networks (`champion_dir`: the artifacts root it was trained in) carried
    over to the catalogue of `features_dir` and fine-tuned on the sequences of the users in
    `window_file` (the window's events, by id) plus a replay sample, as fine-tuning and its refit
    split the work: the selected network (validation; it never saw a validation event) on
    everything before each user's validation event, the deployable one on everything before the
    test event. So the gate and evaluation read the update as they read a nightly model. Writes
    what the fine-tuning stage writes (`model/`, `selected_model/`, `factors.npz`,
    `item_embeddings.npy`, `training.json`)."""
    import json

    import polars as pl

    from components.bert.model import load_model, save_model
    from components.bert.train import _write_factors, write_epoch_log
    from components.sequences import load_sequences

    old_ids = pl.read_parquet(champion_dir / "features" / "items.parquet").sort("item_idx")["item_id"].to_list()
    new_ids = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")["item_id"].to_list()
    position = {item: i for i, item in enumerate(old_ids)}
    old_index = np.array([position.get(item, -1) for item in new_ids], dtype=np.int64)
    champion = load_model(champion_dir / "bert" / "model")
    text = np.load(text_dir / "embeddings.npy") if "text" in champion.cfg.mode else None
    before = carry_items(champion, old_index, text)
    model = carry_items(champion, old_index, text)
    selected = carry_items(load_model(champion_dir / "bert" / "selected_model"), old_index, text)

    seqs = load_sequences(features_dir)
    user_ids = pl.read_parquet(features_dir / "user_map.parquet").sort("user_idx")["user_id"].to_list()
    active = set(pl.read_parquet(window_file)["user_id"].cast(pl.Utf8).to_list())
    changed = [u for u, uid in enumerate(user_ids) if uid in active]
    changed_set = set(changed)
    updates = {}
    for name, net, split in (("selected", selected, "valid"), ("deployable", model, "test")):
        sequences = seqs.histories(split)
        others = [sequences[u] for u in range(seqs.n_users) if u not in changed_set and sequences[u].size >= 2]
        counts = np.bincount(np.concatenate(sequences), minlength=seqs.n_items)
        updates[name] = incremental_update(net, [sequences[u] for u in changed], others, cfg, bert, seed,
                                           item_counts=counts)

    # The window's users' newest events: what the update is for.
    targets = seqs.target_matrix("test")
    scored = np.array([u for u in changed if targets.indptr[u + 1] > targets.indptr[u]], dtype=np.int64)
    histories = seqs.histories("test")
    exclude = seqs.history_matrix("test")[scored]
    found = {}
    for name, net in (("champion", before), ("updated", model)):
        found[name] = rank_users(net, [histories[u] for u in scored], exclude, targets[scored])

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir / "model")
    save_model(selected, out_dir / "selected_model")
    _write_factors(selected, model, features_dir, out_dir)
    write_epoch_log(epochs_file, [])

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    result = BertUpdateResult(
        out_dir, updates["deployable"], updates["selected"], int((old_index >= 0).sum()), int((old_index < 0).sum()),
        len(changed), int(scored.size), mean(found["champion"][0]), mean(found["updated"][0]),
        mean(found["champion"][1]), mean(found["updated"][1]))
    (out_dir / "training.json").write_text(json.dumps(
        {"stage": "update_bert", "initialized_from": str(champion_dir / "bert"), **result.metrics()},
        indent=2, default=float))
    log.info(result.describe())
    return result


# --------------------------------------------------------------------------------------------
# The component: the champion's MF carried over without ALS iterations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MFUpdateResult:
    factors_path: Path
    n_users: int
    n_items: int
    carried_items: int
    new_items: int
    train_seconds: float

    def metrics(self) -> dict[str, float]:
        return {"n_users": self.n_users, "n_items": self.n_items, "carried_items": self.carried_items,
                "new_items": self.new_items, "train_seconds": self.train_seconds}

    def describe(self) -> str:
        return (f"update_mf: {self.carried_items} items carried, {self.new_items} new items solved, {self.n_users} "
                f"users folded in, {self.train_seconds:.1f} s -> {self.factors_path}")


def _als(cfg: MFConfig, seed: int, items: np.ndarray, users: np.ndarray | None = None):
    """An `implicit` ALS model holding given factors (its Gram-matrix caches start empty)."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=items.shape[1], regularization=cfg.regularization, alpha=cfg.alpha,
                                    num_threads=cfg.num_threads, random_state=seed)
    model.item_factors = np.ascontiguousarray(items, dtype=np.float32)
    if users is not None:
        model.user_factors = np.ascontiguousarray(users, dtype=np.float32)
    return model


def update_mf(features_dir: Path, champion_dir: Path, out_dir: Path, cfg: MFConfig, seed: int) -> MFUpdateResult:
    """The champion's ALS (`champion_dir`: the artifacts root it was trained in) over the
    catalogue of `features_dir` without refitting: known items keep their factors; every user is
    folded in (the closed-form user step) from their history; new items get the closed-form item
    step from the users who interacted with them; then users are folded in again with them. Per
    split, as `train_mf` writes it (`factors.npz`, `ids.json`, `model.json`)."""
    import json

    import polars as pl
    from threadpoolctl import threadpool_limits

    from components.factors import FILE_NAME, FactorModel
    from components.sequences import load_sequences
    from components.train_mf import confidence_matrix, fold_in

    start = time.perf_counter()
    old = FactorModel.load(champion_dir / "mf" / FILE_NAME)
    old_ids = json.loads((champion_dir / "mf" / "ids.json").read_text())["items"]
    item_ids = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")["item_id"].to_list()
    position = {item: i for i, item in enumerate(old_ids)}
    index = np.array([position.get(item, -1) for item in item_ids], dtype=np.int64)
    known, new = index >= 0, np.flatnonzero(index < 0)
    seqs = load_sequences(features_dir)
    users, items = {}, {}
    for split in ("valid", "test"):
        history = confidence_matrix(seqs, split, cfg)
        table = np.zeros((len(item_ids), old.items[split].shape[1]), np.float32)
        table[known] = old.items[split][index[known]]
        # New items' zero rows add nothing to a user's solve: this fold-in uses the known items.
        folded = fold_in(_als(cfg, seed, table), history)
        if new.size:
            with threadpool_limits(1, "blas"):
                table[new] = _als(cfg, seed, table, folded).recalculate_item(new, history.T.tocsr()[new])
            folded = fold_in(_als(cfg, seed, table), history)
        users[split], items[split] = folded, table
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    FactorModel(items=items, users=users).save(out_dir / FILE_NAME)
    user_ids = pl.read_parquet(features_dir / "user_map.parquet").sort("user_idx")["user_id"].to_list()
    (out_dir / "ids.json").write_text(json.dumps({"users": user_ids, "items": item_ids}))
    (out_dir / "model.json").write_text(json.dumps(
        {"model": "als", "library": "implicit", "factors": int(items["test"].shape[1]),
         "regularization": cfg.regularization, "alpha": cfg.alpha, "use_weights": cfg.use_weights,
         "recency_half_life": cfg.recency_half_life, "recency_boost": cfg.recency_boost,
         "n_users": seqs.n_users, "n_items": len(item_ids), "train_seconds": seconds,
         "updated_from": str(champion_dir / "mf"), "new_items": int(new.size)}, indent=2))
    result = MFUpdateResult(out_dir / FILE_NAME, seqs.n_users, len(item_ids), int(known.sum()), int(new.size), seconds)
    log.info(result.describe())
    return result


def main() -> int:
    """`python -m components.incremental drift|update --champion-root DIR --window FILE`: the
    drift of a window of events, or the champion's MF and sequence model updated on it into
    `--artifacts`
    (whose features and text embeddings must already cover the champion's data plus the window,
    as the incremental flow builds them)."""
    import argparse
    import json

    from components.cli import add_params_arguments, params_from_args, run_main
    from components.pipeline import Artifacts

    parser = argparse.ArgumentParser(description="Drift of new events, and the incremental update of the champion.")
    parser.add_argument("command", choices=["drift", "update"])
    parser.add_argument("--champion-root", type=Path, required=True,
                        help="the artifacts root the champion was trained in")
    parser.add_argument("--window", type=Path, required=True, help="the new events (parquet: user_id, item_id, timestamp)")
    add_params_arguments(parser)

    def run() -> int:
        args = parser.parse_args()
        params = params_from_args(args)
        if args.command == "drift":
            drift = window_drift(args.champion_root / "features", args.window, params.seed)
            decision = decide(drift, 0, params.incremental)
            print(json.dumps({**drift.metrics(), "decision": decision.action, "reason": decision.reason}, indent=2))
            return 0
        art = Artifacts(args.artifacts)
        print(update_mf(art.features, args.champion_root, art.mf, params.mf, params.seed).describe())
        result = update_bert(art.features, art.text_embeddings, args.champion_root, args.window, art.bert,
                             art.finetune_epochs, params.incremental, params.bert, params.seed)
        print(result.describe())
        return 0

    run_main(run)
    return 0


if __name__ == "__main__":
    main()
