"""Matrix factorization for implicit feedback: ALS from the `implicit` library.

ALS minimises the same regularised squared loss as the gradient-descent MF of the literature
(Hu, Koren & Volinsky 2008, "Collaborative Filtering for Implicit Feedback Datasets"):

    sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + lambda (sum_u |x_u|^2 + sum_i |y_i|^2)

with p_ui = 1 for observed pairs (0 otherwise) and confidence c_ui = 1 + alpha * r_ui (implicit
uses alpha * r_ui as the confidence of observed pairs). Instead of gradient steps, it alternates
between the two factor matrices: with the items fixed, each user's row is the closed-form
solution of a ridge regression, (Y^T C_u Y + lambda I)^-1 Y^T C_u p_u, and vice versa.

Confidence design. r_ui is 1 per interaction (or the rating, with `use_weights`), times a
recency factor 1 + boost * 0.5^(k / half_life), where k counts the user's later interactions
(0 = most recent). Next-item prediction rewards recent taste; the factor is what lets a
time-blind MF use it. `recency_half_life: 0` turns it off (plain ALS).

Protocol. The validation user vectors come from a model fitted on the training split; the test
user vectors from a model refitted on training + validation, i.e. on everything before the test
item (what a deployed model would have seen, and the protocol behind the published ALS
figures); `mf.refit: continue` makes that refit continue from the validation model for
`mf.refit_iterations` instead (cheaper at scale). In both cases the user vectors are then
solved again from the user's full history with the final item factors fixed (conjugate-gradient
steps from the fitted users; the closed form above for a new history): that is also how a
deployed MF reflects a user's newest interactions without retraining.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from components.config import MFConfig, ParamsError
from components.factors import FILE_NAME, FactorModel
from components.sequences import SPLIT_CODES, Sequences, load_sequences, places_from_end, recency_factor

FOLD_IN_CG_STEPS = 2  # see fold_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MFResult:
    factors_path: Path
    n_users: int
    n_items: int
    train_seconds: float

    def describe(self) -> str:
        return f"mf: {self.n_users} users x {self.n_items} items in {self.train_seconds:.1f} s -> {self.factors_path}"


def fit_als(train: sp.csr_matrix, cfg: MFConfig, seed: int, show_progress: bool = True,
            start=None, iterations: int | None = None):
    """Fit implicit's ALS on a users x items matrix; returns the fitted model. `start`: a fitted
    model whose factors this fit continues from, for `iterations` (default `cfg.iterations`)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    n = cfg.iterations if iterations is None else iterations

    def progress(iteration: int, seconds: float, _loss) -> None:
        if not show_progress:  # a terminal gets implicit's bar; a log (a 100M fit: 15 min) a line each
            log.info("ALS iteration %d/%d: %.1f s", iteration + 1, n, seconds)

    # implicit parallelises over users itself; a multi-threaded BLAS underneath only contends
    # (and implicit warns about it when the model is built).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=cfg.factors,
            regularization=cfg.regularization,
            alpha=cfg.alpha,
            iterations=n,
            random_state=seed,
            num_threads=cfg.num_threads,
        )
        if start is not None:
            model.user_factors, model.item_factors = start.user_factors.copy(), start.item_factors.copy()
        if als_device(cfg.device) == "cuda":
            # The same model on the GPU (implicit's own conversions), back on the CPU for the
            # rest. implicit's GPU fit does not apply alpha itself (its CPU fit and the fold-in do).
            gpu = model.to_gpu()
            gpu.fit(train.astype(np.float32) * np.float32(cfg.alpha), show_progress=show_progress, callback=progress)
            model = gpu.to_cpu()
            model.num_threads = cfg.num_threads
            return model
        model.fit(train, show_progress=show_progress, callback=progress)
    return model


def als_device(wanted: str) -> str:
    """"cuda" where implicit's CUDA build finds a GPU and `wanted` allows it, else "cpu"; asking
    for "cuda" without one is an error saying what to install."""
    if wanted == "cpu":
        return "cpu"
    import warnings

    with warnings.catch_warnings():  # implicit warns at import when it finds no GPU
        warnings.simplefilter("ignore")
        import implicit.gpu
    if implicit.gpu.HAS_CUDA:
        return "cuda"
    if wanted == "cuda":
        raise ParamsError("mf.device=cuda, but implicit finds no GPU: on a CUDA machine, `pip install rmm-cu12` "
                           "(or rmm-cu13) beside implicit enables its GPU build; or set mf.device=auto / cpu")
    return "cpu"


def confidence_matrix(seqs: Sequences, split: str, cfg: MFConfig) -> sp.csr_matrix:
    """Users x items values r_ui from everything before `split`, with the recency factor.

    Built as CSR directly from the sequences (already grouped by user), in 32-bit arrays: at
    100M interactions a COO detour with 64-bit indices and float64 decay costs ~4 GB more."""
    keep = seqs.split < SPLIT_CODES[split]
    # Each row's start minus the dropped entries before it: a search among the dropped (the later
    # splits: two per user with leave-one-out) beats a cumulative count over every entry (~15x
    # at 100M).
    indptr = seqs.indptr - np.searchsorted(np.flatnonzero(~keep), seqs.indptr)
    counts = np.diff(indptr)
    values = seqs.weights[keep].astype(np.float32) if cfg.use_weights else np.ones(int(indptr[-1]), np.float32)
    if cfg.recency_half_life > 0:
        # k = how many later kept interactions the user has.
        from_end = places_from_end(counts).astype(np.float32)
        values *= recency_factor(from_end, np.float32(cfg.recency_half_life), np.float32(cfg.recency_boost))
        del from_end
    matrix = sp.csr_matrix((values, seqs.items[keep].astype(np.int32), indptr), shape=(seqs.n_users, seqs.n_items))
    matrix.sum_duplicates()
    return matrix


def fold_in(model, history: sp.csr_matrix, start: np.ndarray | None = None) -> np.ndarray:
    """User vectors solved from `history` with the item factors fixed: in closed form, or, from
    `start` (the fitted users of the same history), by conjugate-gradient steps; `start` is then
    refined in place (a 5M-user table is 2.5 GB) and returned."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        if start is None:
            return model.recalculate_user(np.arange(history.shape[0]), history.tocsr())
        # The solver of one ALS half-iteration, from users already near the answer, with two
        # conjugate-gradient steps (implicit's fit takes three): at 100M interactions several
        # times faster than the closed form (a 128 x 128 solve per user). On both datasets'
        # inner split the default refit's metrics are the same as with three steps to four
        # decimals; a refit continued for 3 loses 1.5 % on MovieLens (benchmarks/README.md, "Scale").
        users = np.require(start, np.float32, ["C", "W"])
        confidence = history.tocsr().astype(np.float32) * np.float32(model.alpha)
        model.solver(confidence, users, model.item_factors, model.regularization, num_threads=model.num_threads,
                     cg_steps=FOLD_IN_CG_STEPS)
        return users


def train_mf(features_dir: Path, out_dir: Path, cfg: MFConfig, seed: int) -> MFResult:
    """Train ALS on the training split and write `factors.npz` + `ids.json` + `model.json`."""
    device = als_device(cfg.device)  # a device that cannot be had fails before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    seqs = load_sequences(features_dir, mapped=True)
    start = time.perf_counter()
    users, items, phases = {}, {}, {}
    model = None
    for split in ("valid", "test"):
        # Fit on everything before `split`; fold users in from the same history. The test fit
        # continues from the validation model where `mf.refit` says so.
        history = confidence_matrix(seqs, split, cfg)
        warm = split == "test" and cfg.refit == "continue"
        iterations = cfg.refit_iterations if warm else cfg.iterations
        log.info("ALS on everything before %s: %d users x %d items, %d interactions, %d iterations%s",
                 split, *history.shape, history.nnz, iterations, " from the validation model" if warm else "")
        phase = time.perf_counter()
        model = fit_als(history, cfg, seed, show_progress=sys.stderr.isatty(), start=model if warm else None,
                        iterations=iterations)
        phases[f"fit_{split}"] = time.perf_counter() - phase
        phase = time.perf_counter()
        users[split] = fold_in(model, history, start=model.user_factors)
        phases[f"fold_in_{split}"] = time.perf_counter() - phase
        # The validation tables stay as they are: a continued fit works on copies.
        items[split] = np.asarray(model.item_factors, dtype=np.float32)
        del history
    del model
    train_seconds = time.perf_counter() - start

    # The two fits have different factor spaces, so each split keeps its own item table.
    factors = FactorModel(items=items, users=users)
    factors_path = out_dir / FILE_NAME
    factors.save(factors_path)

    user_ids = pl.read_parquet(features_dir / "user_map.parquet").sort("user_idx")["user_id"].to_list()
    item_ids = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")["item_id"].to_list()
    (out_dir / "ids.json").write_text(json.dumps({"users": user_ids, "items": item_ids}))
    (out_dir / "model.json").write_text(
        json.dumps(
            {
                "model": "als",
                "library": "implicit",
                "factors": cfg.factors,
                "regularization": cfg.regularization,
                "alpha": cfg.alpha,
                "iterations": cfg.iterations,
                "refit": cfg.refit,
                "device": device,
                "refit_iterations": cfg.refit_iterations,
                "use_weights": cfg.use_weights,
                "recency_half_life": cfg.recency_half_life,
                "recency_boost": cfg.recency_boost,
                "n_users": seqs.n_users,
                "n_items": seqs.n_items,
                "train_seconds": train_seconds,
                "phase_seconds": phases,
            },
            indent=2,
        )
    )
    log.info("ALS: %d factors in %.1f s (%s)", cfg.factors, train_seconds, ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return MFResult(factors_path, seqs.n_users, seqs.n_items, train_seconds)


if __name__ == "__main__":
    from components.pipeline import main

    main("train_mf")
