"""Offline evaluation: full ranking over every item, for every model, on validation and test.

Every model hands evaluation the same thing, a factor model (`components/factors.py`): per
split, item vectors and one user vector per user, with score = user . item.

Protocol: for split S, the user's history is everything before S (train for validation, train +
validation for test); history items are excluded from the ranking; the targets are the user's
interactions in S. Slices: users with few training interactions, and long-tail targets.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from components.config import EvaluationConfig, FusionConfig
from components.factors import EVAL_SPLITS, FILE_NAME, FactorModel
from components.sequences import Sequences, load_sequences
from components import metrics

log = logging.getLogger(__name__)

HEADLINE = ("recall", "ndcg", "mrr", "coverage")

@dataclass(frozen=True)
class EvaluationResult:
    metrics_path: Path
    valid_metrics_path: Path
    test: dict[str, dict[str, float]]
    valid: dict[str, dict[str, float]]
    plot_path: Path
    ks: tuple[int, ...] = (10,)

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """The headline metrics per split and model (the slices stay in `metrics.json`)."""
        keys = [f"{m}@{k}" for k in self.ks for m in HEADLINE]
        return {split: {model: {k: row[k] for k in keys if k in row} for model, row in rows.items()}
                for split, rows in (("test", self.test), ("valid", self.valid))}

    def describe(self) -> str:
        return ("Test metrics (full ranking, history items excluded):\n" + format_table(self.test, list(self.ks))
                + f"\n\nwritten: {self.metrics_path}, {self.valid_metrics_path}, {self.plot_path}")


def popularity_model(train: sp.csr_matrix, n_users: int) -> FactorModel:
    """Most-interacted items first (training counts); the same list for every user."""
    counts = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)
    ones = np.ones((n_users, 1), dtype=np.float32)
    return FactorModel(items={s: counts[:, None] for s in EVAL_SPLITS}, users={s: ones for s in EVAL_SPLITS})


# Score blocks at least this large take torch's top-k (multi-threaded; on this 2-core CPU ~10x
# numpy's argpartition on 1,024 x 100k scores); smaller ones are not worth importing torch for.
FAST_TOP_K_MIN_SIZE = 1 << 20
# Long rows are cut into groups of this many items: one pass finds each group's best score, and
# the top-k is taken among the few groups that can hold it (~2x faster than torch.topk over
# 1M items; the score matrix product then dominates evaluation).
TOP_K_GROUP = 1024


def block_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """`metrics.top_k` of a block of scores, the same answer faster on large float32 blocks:
    torch.topk picks among scores tied at the k-th place in no fixed way, so the rows whose
    (k+1)-th score equals their k-th (a tie across the cut, or fewer than k scores above -inf),
    and rows holding NaN, are ranked by `metrics.top_k`; in the other rows the k items torch found are the set, ordered
    by score then index as `metrics.top_k` orders them."""
    if k <= 0 or k >= scores.shape[1] or scores.size < FAST_TOP_K_MIN_SIZE or scores.dtype != np.float32:
        return metrics.top_k(scores, k)
    values, part = _torch_top(np.ascontiguousarray(scores), k + 1)
    # torch ranks NaN first and numpy last: a row with one (first place here) goes to numpy too.
    tied = np.flatnonzero((values[:, k - 1] == values[:, k]) | np.isnan(values[:, 0]))
    values, part = values[:, :k], part[:, :k]
    out = np.take_along_axis(part, np.lexsort((part, -values), axis=1), axis=1)
    if tied.size:
        out[tied] = metrics.top_k(scores[tied], k)
    return out


def _torch_top(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m largest scores of each row and their columns, as torch.topk gives them (the same
    values; among equal scores, any of them). Long rows are ranked among the m groups with the
    best maxima: those m maxima are m scores at least as high as any score outside the groups,
    so the groups hold the row's m best values, and every score above the m-th best."""
    import torch

    block = torch.from_numpy(scores)
    rows, n = block.shape
    group = TOP_K_GROUP
    if n < 4 * (m + 1) * group:
        values, index = torch.topk(block, m, dim=1)
        return values.numpy(), index.numpy()
    whole = n // group * group
    maxima = block[:, :whole].view(rows, n // group, group).amax(-1)
    if whole < n:
        maxima = torch.cat([maxima, block[:, whole:].amax(-1, keepdim=True)], dim=1)
    groups = torch.topk(maxima, m, dim=1).indices
    columns = (groups[:, :, None] * group + torch.arange(group)).reshape(rows, m * group)
    candidates = torch.gather(block, 1, columns.clamp(max=n - 1))
    candidates[columns >= n] = float("-inf")  # past the end of a short last group
    values, picked = torch.topk(candidates, m, dim=1)
    return values.numpy(), torch.gather(columns, 1, picked).numpy()


# The most score memory one block of users may take: `batch_size` users x 1M items would be 8 GB.
BLOCK_BYTES = 256 << 20


def rank(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    exclude: sp.csr_matrix,
    k: int,
    batch_size: int,
) -> np.ndarray:
    """Top-k item indices per user by dot product, excluding each user's `exclude` items (ties:
    lower index first); users in blocks of `batch_size`, fewer where a block's scores would pass
    BLOCK_BYTES. Large catalogues are scanned in order of item norm (`_rank_by_norm`)."""
    n_users = user_vectors.shape[0]
    k = min(k, item_vectors.shape[0])
    exclude = exclude.tocsr()
    shared = np.diff(exclude.indptr) + k <= item_vectors.shape[0]
    if (n_users > 1 and shared.any() and (user_vectors[1] == user_vectors[0]).all()
            and (user_vectors == user_vectors[:1]).all()):
        # Popularity: no score block per user (at 1M items, as costly as ranking MF's).
        common = user_vectors[0].astype(np.float32) @ item_vectors.T.astype(np.float32)
        if np.isfinite(common).all():
            out = np.empty((n_users, k), dtype=np.int64)
            out[shared] = _rank_shared(common, exclude[shared], k)
            if not shared.all():
                out[~shared] = rank(user_vectors[~shared], item_vectors, exclude[~shared], k, batch_size)
            return out
    if item_vectors.shape[0] > NORM_TILE and 0 < k < item_vectors.shape[0]:
        return _rank_by_norm(user_vectors, item_vectors, exclude, k, batch_size)
    return _rank_blocks(user_vectors, item_vectors, exclude, k, batch_size)


def _rank_blocks(
    user_vectors: np.ndarray, item_vectors: np.ndarray, exclude: sp.csr_matrix, k: int, batch_size: int,
) -> np.ndarray:
    """`rank` by scoring every item for every user, a block of users at a time."""
    n_users = user_vectors.shape[0]
    batch_size = max(1, min(batch_size, BLOCK_BYTES // (4 * max(item_vectors.shape[0], 1))))
    out = np.empty((n_users, k), dtype=np.int64)
    items_t = np.ascontiguousarray(item_vectors.T, dtype=np.float32)
    for lo in range(0, n_users, batch_size):
        hi = min(lo + batch_size, n_users)
        out[lo:hi] = top_k_outside(user_vectors[lo:hi].astype(np.float32) @ items_t, exclude[lo:hi], k)
    return out


def top_k_outside(scores: np.ndarray, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """Top-k of a block of scores [users, items], each row's `exclude` items left out, as `rank`
    ranks them. `scores` is overwritten (the excluded ones set to -inf)."""
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(exclude.indptr))
    scores[rows, exclude.indices] = -np.inf
    return block_top_k(scores, k)


def ndcg_of_scores(scores: np.ndarray, exclude: sp.csr_matrix, targets: sp.csr_matrix, k: int) -> np.ndarray:
    """Per-user NDCG@k of a block of scores, ranked as the evaluate stage ranks (`top_k_outside`;
    `scores` is overwritten): for scores that are no factor model's, such as a mixture's."""
    return metrics.ndcg_at_k(metrics.hits(top_k_outside(scores, exclude, k), targets), np.diff(targets.indptr), k)


# Catalogues larger than this are scanned in tiles of items in decreasing norm, the first tile
# this many items, each next one twice the last. With ALS factors at 100M interactions (1M
# items) a user's top 20 is settled within the first 1.4 % of items by norm (median; 2.7 % at
# most): the ranking costs ~1/50 of scoring every item (benchmarks/README.md, "Scale").
NORM_TILE = 16384


def _rank_by_norm(
    user_vectors: np.ndarray, item_vectors: np.ndarray, exclude: sp.csr_matrix, k: int, batch_size: int,
) -> np.ndarray:
    """`rank`, the same answer, without scoring items that cannot reach a user's top k (the
    same up to scores equal but for float32's last bit, which any two block sizes of
    `_rank_blocks` may already order differently: BLAS rounds a product by its shape).

    Items are scored in tiles of decreasing norm, keeping each user's k+1 best so far. By
    Cauchy-Schwarz no item after position j scores above |u| * |v_j| (|v_j|: the norm at j,
    widened by float32's worst rounding of a d-term dot product), so a user whose k-th best
    already beats that is done: every item left scores below it, and cannot enter the top k or
    tie with its last place. The k+1 values kept are the true k+1 best or, past that bound,
    hold a (k+1)-th below the k-th, so a tie across the cut shows as equal k-th and (k+1)-th
    values, exactly as in `block_top_k`; those rows, rows with NaN and rows with fewer than k
    items left are ranked by `_rank_blocks` (every item scored)."""
    import torch

    n_users, (n_items, dim) = user_vectors.shape[0], item_vectors.shape
    items = np.asarray(item_vectors, dtype=np.float32)
    users = np.asarray(user_vectors, dtype=np.float32)
    norms = _row_norms(items)
    order = np.argsort(-norms, kind="stable")  # NaN norms last: every user scans them
    place = np.empty(n_items, dtype=np.int64)
    place[order] = np.arange(n_items)
    # float32 rounds a d-term dot product by at most ~d eps/2 of sum |u_i v_i| <= |u| |v|, plus
    # an absolute half step per operation among subnormals; both widened here.
    slack = 1.0 + 4.0 * dim * float(np.finfo(np.float32).eps)
    floor = 4.0 * dim * float(np.finfo(np.float32).smallest_subnormal)
    reach = norms[order] * slack
    tiles = torch.from_numpy(np.ascontiguousarray(items[order]))
    user_norms = _row_norms(users)
    m = k + 1
    out = np.empty((n_users, k), dtype=np.int64)
    redo = []
    for lo in range(0, n_users, max(1, batch_size)):
        hi = min(lo + max(1, batch_size), n_users)
        block = exclude[lo:hi]
        seen_row = np.repeat(np.arange(hi - lo), np.diff(block.indptr))
        seen_at = place[block.indices]
        by_place = np.argsort(seen_at, kind="stable")
        seen_row, seen_at = seen_row[by_place], seen_at[by_place]
        best = torch.full((hi - lo, m), float("-inf"))
        best_at = torch.full((hi - lo, m), n_items, dtype=torch.int64)
        active = np.arange(hi - lo)
        start, width = 0, NORM_TILE
        while active.size and start < n_items:
            stop = min(n_items, start + width)
            a, b = np.searchsorted(seen_at, [start, stop])
            here_row, here_at = seen_row[a:b], seen_at[a:b] - start
            rows_per_chunk = max(1, BLOCK_BYTES // (4 * (stop - start)))
            for c in range(0, active.size, rows_per_chunk):
                rows = active[c:c + rows_per_chunk]
                scores = torch.from_numpy(users[lo + rows]) @ tiles[start:stop].T
                slot = np.full(hi - lo, -1)
                slot[rows] = np.arange(rows.size)
                hit = slot[here_row] >= 0
                scores[torch.from_numpy(slot[here_row[hit]]), torch.from_numpy(here_at[hit])] = float("-inf")
                values, at = _torch_top(scores.numpy(), min(m, stop - start))
                pool = torch.cat([best[rows], torch.from_numpy(values)], dim=1)
                pool_at = torch.cat([best_at[rows], torch.from_numpy(at) + start], dim=1)
                values, pick = torch.topk(pool, m, dim=1)
                best[rows], best_at[rows] = values, torch.gather(pool_at, 1, pick)
            start, width = stop, 2 * width
            if start < n_items:
                kth = best[torch.from_numpy(active), k - 1].numpy().astype(np.float64)
                # An overflowed (+inf) k-th score may tie items further on: never done.
                done = np.isfinite(kth) & (kth > user_norms[lo + active] * reach[start] + floor)
                active = active[~done]
        values, at = best.numpy(), best_at.numpy()
        redo.append(lo + np.flatnonzero((values[:, k - 1] == values[:, k]) | np.isnan(values).any(axis=1)))
        ids = order[np.minimum(at[:, :k], n_items - 1)]
        out[lo:hi] = np.take_along_axis(ids, np.lexsort((ids, -values[:, :k]), axis=1), axis=1)
    redo = np.concatenate(redo)
    if redo.size:
        out[redo] = _rank_blocks(users[redo], items, exclude[redo], k, batch_size)
    return out


def _row_norms(vectors: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, accumulated in float64 a slice at a time."""
    out = np.empty(vectors.shape[0], dtype=np.float64)
    for lo in range(0, vectors.shape[0], 1 << 16):
        part = vectors[lo:lo + (1 << 16)].astype(np.float64)
        out[lo:lo + part.shape[0]] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return out


def _rank_shared(scores: np.ndarray, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """`rank` when every user has the same vector (popularity) and at least k items outside
    their history: one order of the items, and each user's first k items of it outside the
    history (the same items in the same order as ranking each user's scores)."""
    order = metrics.top_k(scores[None, :], scores.size)[0]
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    counts = np.diff(exclude.indptr)
    out = np.empty((exclude.shape[0], k), dtype=np.int64)
    by_count = np.argsort(counts, kind="stable")  # blocks of users with alike history lengths
    lo = 0
    while lo < by_count.size:
        # At most ~4M places a block (fewer users where histories are long).
        rows_wanted = max(1, min(1024, (4 << 20) // (int(counts[by_count[min(lo + 1023, by_count.size - 1)]]) + k)))
        block = by_count[lo:lo + rows_wanted]
        lo += block.size
        # A user's k best lie among the first k + (history length) places of the order.
        length = int(counts[block].max()) + k
        rows = exclude[block]
        taken = np.zeros((block.size, length), dtype=bool)
        at = place[rows.indices]
        row_of = np.repeat(np.arange(block.size), np.diff(rows.indptr))
        taken[row_of[at < length], at[at < length]] = True
        out[block] = order[np.argsort(taken, axis=1, kind="stable")[:, :k]]
    return out


def sample_users(users: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """`users`, or a uniform sample of `max_users` of them drawn with `seed` (sorted): the same
    users for every model given the same candidates."""
    if max_users is not None and max_users < 1:
        raise ValueError(f"evaluation.max_users must be at least 1 (null: every user), got {max_users}")
    if max_users is None or users.size <= max_users:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))


def interval95(values: np.ndarray) -> tuple[float, float]:
    """95 % interval of the mean of per-user values (normal approximation: users are many)."""
    if values.size < 2:
        return float("nan"), float("nan")
    half = 1.96 * float(values.std(ddof=1)) / np.sqrt(values.size)
    return float(values.mean()) - half, float(values.mean()) + half


def _ranked(
    model: FactorModel, seqs: Sequences, split: str, k: int, batch_size: int, max_users: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """The users with a target in `split` (all, or a seeded sample of `max_users`), their top-k
    (history excluded) and their targets. Users are ranked `batch_size` at a time: memory holds
    one block of scores, whatever the number of users."""
    targets = seqs.target_matrix(split)
    users = sample_users(np.flatnonzero(np.diff(targets.indptr) > 0), max_users, seed)
    topk = rank(model.users[split][users], model.items[split], seqs.history_matrix(split)[users], k, batch_size)
    return users, topk, targets[users]


def per_user_ndcg(model: FactorModel, seqs: Sequences, split: str, k: int, batch_size: int) -> np.ndarray:
    """NDCG@k of every user with a target in `split` (user order), for paired comparisons."""
    _, topk, t = _ranked(model, seqs, split, k, batch_size)
    return metrics.ndcg_at_k(metrics.hits(topk, t), np.diff(t.indptr), k)


def evaluate_split(
    model: FactorModel,
    seqs: Sequences,
    split: str,
    cfg: EvaluationConfig,
    train_counts: np.ndarray,
    head_items: np.ndarray,
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one model on one split, with slices and the 95 % interval of each headline
    mean over users (`evaluation.max_users`: over a seeded sample of them); also returns the
    Recall@k curve."""
    max_k = max(cfg.ks)
    users, topk, t = _ranked(model, seqs, split, max_k, cfg.batch_size, cfg.max_users, cfg.sample_seed)
    result = metrics.summarize(topk, t, cfg.ks, seqs.n_items)
    result["n_users"] = float(users.size)
    result["n_users_eligible"] = float(np.count_nonzero(np.diff(seqs.target_matrix(split).indptr)))
    hit, n_targets = metrics.hits(topk, t), np.diff(t.indptr)
    for k in cfg.ks:
        for name, values in (("ndcg", metrics.ndcg_at_k(hit, n_targets, k)),
                             ("recall", metrics.recall_at_k(hit, n_targets, k)), ("mrr", metrics.mrr_at_k(hit, k))):
            result[f"{name}@{k}_ci95_low"], result[f"{name}@{k}_ci95_high"] = interval95(values)

    short = train_counts[users] <= cfg.short_history_max
    for key, value in metrics.summarize(topk[short], t[short], cfg.ks, seqs.n_items).items():
        if not key.startswith("coverage"):
            result[f"short_history/{key}"] = value
    result["short_history/n_users"] = float(short.sum())

    # Long tail: only targets outside the head count, for users who have such a target.
    tail_targets = t.multiply(~head_items[None, :]).tocsr()
    tail_targets.eliminate_zeros()
    has_tail = np.diff(tail_targets.indptr) > 0
    for key, value in metrics.summarize(topk[has_tail], tail_targets[has_tail], cfg.ks, seqs.n_items).items():
        if not key.startswith("coverage"):
            result[f"long_tail/{key}"] = value
    result["long_tail/n_users"] = float(has_tail.sum())
    return result, metrics.recall_curve(topk, t, max_k)


def evaluate(
    features_dir: Path,
    models: dict[str, FactorModel],
    out_dir: Path,
    cfg: EvaluationConfig,
    curve_file: Path | None = None,
    seqs: Sequences | None = None,
) -> EvaluationResult:
    """Evaluate every model on validation and test; write metrics JSON, the Recall@k curve
    (CSV, `curve_file`, default `out_dir/recall_at_k.csv`) and its plot. `seqs`: the features'
    sequences when the caller has them loaded already."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seqs = load_sequences(features_dir) if seqs is None else seqs
    train = seqs.history_matrix("valid")
    train_counts = np.diff(train.indptr)
    popularity = np.asarray(train.sum(axis=0)).ravel()
    n_head = int(round(cfg.head_fraction * seqs.n_items))
    head_items = np.zeros(seqs.n_items, dtype=bool)
    head_items[np.argsort(-popularity, kind="stable")[:n_head]] = True

    results: dict[str, dict[str, dict[str, float]]] = {s: {} for s in EVAL_SPLITS}
    curves: dict[str, np.ndarray] = {}
    for name, model in models.items():
        start = time.perf_counter()
        for split in EVAL_SPLITS:
            res, curve = evaluate_split(model, seqs, split, cfg, train_counts, head_items)
            results[split][name] = res
            if split == "test":
                curves[name] = curve
        log.info(
            "%s: test ndcg@%d %.4f recall@%d %.4f (%.1f s)",
            name, cfg.ks[0], results["test"][name][f"ndcg@{cfg.ks[0]}"],
            cfg.ks[0], results["test"][name][f"recall@{cfg.ks[0]}"], time.perf_counter() - start,
        )

    metrics_path = out_dir / "metrics.json"
    valid_path = out_dir / "metrics_valid.json"
    metrics_path.write_text(json.dumps(results["test"], indent=2))
    valid_path.write_text(json.dumps(results["valid"], indent=2))
    max_k = max(cfg.ks)
    curve_file = curve_file or out_dir / "recall_at_k.csv"
    curve_file.parent.mkdir(parents=True, exist_ok=True)
    with curve_file.open("w") as f:
        f.write(",".join(["k", *curves]) + "\n")
        for k in range(1, max_k + 1):
            f.write(",".join([str(k), *(f"{curves[m][k - 1]:.6f}" for m in curves)]) + "\n")
    plot_path = out_dir / "recall_at_k.png"
    _plot(curves, plot_path)
    return EvaluationResult(metrics_path, valid_path, results["test"], results["valid"], plot_path, tuple(cfg.ks))


def _plot(curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, curve.size + 1), curve, label=name, marker="o", markersize=3)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (test)")
    ax.set_title("Recall@K, full ranking")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict[str, dict[str, float]], ks: list[int]) -> str:
    """Markdown table of the headline metrics, one row per model."""
    cols = [f"{m}@{k}" for k in ks for m in HEADLINE]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(res, c) for c in cols) + " |")
    return "\n".join(lines)


def _cell(row: dict[str, float], key: str) -> str:
    low, high = row.get(f"{key}_ci95_low"), row.get(f"{key}_ci95_high")
    value = f"{row.get(key, float('nan')):.4f}"
    return value + (f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None and low == low else "")


def load_models(
    names: list[str], factor_files: dict[str, Path], features_dir: Path, cfg: EvaluationConfig,
    fusion: FusionConfig, out_dir: Path | None = None, seqs: Sequences | None = None,
) -> dict[str, FactorModel]:
    """Build the factor models named in `evaluation.models`: `popularity` from the training
    counts, trained models from their `factor_files`.

    `fused` is the score-level fusion of `fusion.models`, its weight tuned on validation
    NDCG@K (first K of `evaluation.ks`); the weight and the validation curve go to
    `out_dir/fusion.json`. `seqs` as `evaluate` takes them."""
    from components import fusion as fusion_mod

    seqs = load_sequences(features_dir) if seqs is None else seqs
    models: dict[str, FactorModel] = {}

    def load(name: str) -> FactorModel:
        if name not in models:
            if name == "popularity":
                models[name] = popularity_model(seqs.history_matrix("valid"), seqs.n_users)
            else:
                if name not in factor_files:
                    raise ValueError(f"evaluation.models names {name!r}, which no stage trains "
                                     f"(known: popularity, fused, {', '.join(factor_files)})")
                # Mapped: a sample of users reads only its rows of a 5M-user table.
                models[name] = FactorModel.load(factor_files[name], mapped=True)
        return models[name]

    for name in names:
        if name != "fused":
            load(name)
    if "fused" in names:
        if len(fusion.models) != 2 or "fused" in fusion.models:
            raise ValueError("fusion.models must name exactly two trained models")
        a, b = (load(n) for n in fusion.models)
        k = cfg.ks[0]
        counts = np.diff(seqs.history_matrix("valid").indptr)
        no_head = np.zeros(seqs.n_items, dtype=bool)

        def score_valid(model: FactorModel) -> float:
            return evaluate_split(model, seqs, "valid", cfg, counts, no_head)[0][f"ndcg@{k}"]

        result = fusion_mod.tune(a, b, score_valid, fusion.grid_size)
        models["fused"] = result.model
        log.info("fusion: weight %.2f on %s (validation ndcg@%d %.4f)", result.weight, fusion.models[0], k,
                 max(c[1] for c in result.validation_curve))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "fusion.json").write_text(json.dumps(
                {"models": fusion.models, "weight": result.weight, "metric": f"valid ndcg@{k}",
                 "validation_curve": result.validation_curve}, indent=2))
    return {name: models[name] for name in names}


def evaluate_models(features_dir: Path, mf_dir: Path, bert_dir: Path, out_dir: Path, curve_file: Path,
                    cfg: EvaluationConfig, fusion: FusionConfig) -> EvaluationResult:
    """The evaluation stage: every model of `evaluation.models` (the fused one tuned on
    validation), on validation and test."""
    factor_files = {"mf": mf_dir / FILE_NAME, "bert": bert_dir / FILE_NAME}
    seqs = load_sequences(features_dir)  # once for both: at scale, reading them is a cost of its own
    models = load_models(cfg.models, factor_files, features_dir, cfg, fusion, out_dir, seqs)
    return evaluate(features_dir, models, out_dir, cfg, curve_file, seqs)


if __name__ == "__main__":
    from components.pipeline import main

    main("evaluate")
