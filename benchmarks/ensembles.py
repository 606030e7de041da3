"""Ensembles of finished runs, scored as the evaluate stage scores them: several sequence-model
runs averaged, EASE (Steck 2019) as a third model, and their score-level fusions with MF.

Issue 18 asks whether anything short of a stronger sequence model brings Amazon's fused model to
1.20x MF; this answers it from runs already made (`benchmarks.quality --workdir W`, so each
`W/<dataset>` keeps its models) instead of training again:

    python -m benchmarks.ensembles --runs W0/amazon-scientific W1/amazon-scientific --out e.json

Every run must hold the same sequences (the same data, split and seed of the features); MF is
the first run's. Each model is z-scored per user (`components.fusion`), mixtures are weighted
sums of those z-scores, and every choice (EASE's lambda, each mixture's weights, on a grid of
`fusion.grid_size` steps) is made on the validation split. The test split (the inner one when
the runs were made with `features.holdout=inner`) is scored once per row, as NDCG@10 with its
ratio to MF and the 95 % paired-bootstrap interval.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save
from components import metrics
from components.cli import add_params_arguments, params_from_args, run_main
from components.evaluate import ndcg_of_scores, per_user_ndcg
from components.factors import EVAL_SPLITS, FILE_NAME, FactorModel
from components.fusion import mix, user_score_std
from components.sequences import FILE_NAME as SEQUENCES, Sequences, load_sequences

log = logging.getLogger("benchmarks.ensembles")

K = 10
# EASE inverts an items x items matrix: past this many items it is the wrong tool.
EASE_MAX_ITEMS = 20_000


# Every weighting is scored from each model's validation scores held whole (users x items, float32,
# one matrix per model and one for their sum): fine at a research dataset's size, not at a
# production catalogue's.
MAX_SCORE_BYTES = 4 << 30


class EnsembleError(ValueError):
    """Runs or settings this benchmark cannot mix: the message says which and why."""


def check_ease_size(n_items: int) -> None:
    if n_items > EASE_MAX_ITEMS:
        raise EnsembleError(f"EASE inverts an items x items matrix: {n_items} items is more than {EASE_MAX_ITEMS}")


def ease(seqs: Sequences, lam: float, splits: tuple[str, ...] = EVAL_SPLITS) -> FactorModel:
    """EASE as a factor model: per split, B = I - P diagMat(1 / diag(P)) with P = (X'X + lam I)^-1
    and X the (binary) histories before the split; a user's scores X_u B are the factor model
    with users X and items B'. The test split's B is fitted on training + validation, as the
    other models are refitted. `splits`: only those fitted (choosing lambda needs validation's)."""
    check_ease_size(seqs.n_items)
    if lam <= 0:
        raise EnsembleError(f"EASE's lambda must be positive, got {lam}")
    items, users = {}, {}
    for split in splits:
        x = seqs.history_matrix(split).astype(np.float64)
        x.data[:] = 1.0
        p = np.linalg.inv((x.T @ x).toarray() + lam * np.eye(seqs.n_items))
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        users[split] = x.toarray().astype(np.float32)
        items[split] = np.ascontiguousarray(b.T, dtype=np.float32)
    return FactorModel(items=items, users=users)


def simplex(n: int, grid_size: int) -> list[tuple[float, ...]]:
    """The weights of `n` models on a grid of `grid_size` steps per weight, summing to 1."""
    steps = grid_size - 1
    return [tuple(c / steps for c in (*head, steps - sum(head)))
            for head in itertools.product(range(steps + 1), repeat=n - 1) if sum(head) <= steps]


class ValidationScores:
    """The validation split's users, what they saw and their targets, to score many weightings
    of the same models: each model's z-scores are computed once and a weighting is a weighted
    sum of them, ranked as the evaluate stage ranks (`components.evaluate.ndcg_of_scores`)."""

    def __init__(self, seqs: Sequences):
        targets = seqs.target_matrix("valid")
        self.users = np.flatnonzero(np.diff(targets.indptr) > 0)
        self.targets = targets[self.users]
        self.seen = seqs.history_matrix("valid")[self.users].tocsr()

    def z_scores(self, model: FactorModel) -> np.ndarray:
        u, v = model.users["valid"][self.users], model.items["valid"]
        return (u @ v.T / user_score_std(u, v)[:, None]).astype(np.float32)

    def ndcg(self, scores: np.ndarray) -> float:
        """Mean NDCG@K of `scores` [users, items] (overwritten)."""
        return float(ndcg_of_scores(scores, self.seen, self.targets, K).mean())


def labels(roots: list[Path]) -> list[str]:
    """Each run named by its path below the folder all of them share (one run: its folder's name)."""
    if len(roots) == 1:
        return [roots[0].name]
    common = os.path.commonpath([r.resolve() for r in roots])
    return [os.path.relpath(r.resolve(), common) for r in roots]


def run(roots: list[Path], lambdas: list[float], grid_size: int, batch_size: int) -> dict[str, Any]:
    """Every row of the table for the finished runs `roots` (MF from the first): NDCG@10 on
    validation and test, the test's ratio to MF with its interval, and what was chosen on
    validation with the validation scores it was chosen by."""
    if grid_size < 2:
        raise EnsembleError("fusion.grid_size must be at least 2")
    digests = {root: hashlib.sha256((root / "features" / SEQUENCES).read_bytes()).hexdigest() for root in roots}
    if len(set(digests.values())) > 1:
        odd = [str(r) for r, d in digests.items() if d != digests[roots[0]]]
        raise EnsembleError(f"these runs hold other sequences than {roots[0]} (other data, split or seed of the "
                         f"features): {', '.join(odd)}")
    seqs = load_sequences(roots[0] / "features")
    check_ease_size(seqs.n_items)  # before any work, not after the first rows
    need = 4 * 4 * seqs.n_users * seqs.n_items
    if need > MAX_SCORE_BYTES:
        raise EnsembleError(f"{seqs.n_users} users x {seqs.n_items} items: the validation scores of three models "
                            f"would take {need / 2**30:.1f} GiB, more than {MAX_SCORE_BYTES / 2**30:.0f}")

    def ndcg(model: FactorModel, split: str) -> np.ndarray:
        return per_user_ndcg(model, seqs, split, K, batch_size)

    valid = ValidationScores(seqs)

    def best(models: list[FactorModel]) -> tuple[FactorModel, dict[str, Any]]:
        z = [valid.z_scores(m) for m in models]
        curve = [(weights, valid.ndcg(sum(w * zi for w, zi in zip(weights, z))))
                 for weights in simplex(len(models), grid_size)]
        # Ties go to the weights closest to an even mix, as the product's fusion breaks them.
        even = 1.0 / len(models)
        weights = max(curve, key=lambda c: (c[1], -sum((w - even) ** 2 for w in c[0])))[0]
        return mix(models, list(weights)), {"weights": list(weights),
                                            "validation_curve": [[*w, v] for w, v in curve]}

    mf = FactorModel.load(roots[0] / "mf" / FILE_NAME)
    berts = [FactorModel.load(root / "bert" / FILE_NAME) for root in roots]
    reference = ndcg(mf, "test")
    rows: list[dict[str, Any]] = []

    def row(name: str, model: FactorModel, **extra: Any) -> None:
        test = ndcg(model, "test")
        r, low, high = metrics.paired_bootstrap_ratio(test, reference)
        rows.append({"model": name, "valid_ndcg@10": float(ndcg(model, "valid").mean()), "ndcg@10": float(test.mean()),
                     "ratio_to_mf": r, "ci95": [low, high], **extra})
        chosen = {k: v for k, v in extra.items() if k in ("weights", "lambda")}
        log.info("%s: valid %.4f, test %.4f, %.3fx MF [%.3f, %.3f]%s", name, rows[-1]["valid_ndcg@10"],
                 rows[-1]["ndcg@10"], r, low, high, f" {chosen}" if chosen else "")

    row("mf", mf)
    for label, bert in zip(labels(roots), berts):
        row(f"bert ({label})", bert)
    if len(berts) > 1:
        average = mix(berts, [1.0 / len(berts)] * len(berts))
        row(f"bert, {len(berts)} runs averaged", average)
    by_lambda = {lam: float(ndcg(ease(seqs, lam, ("valid",)), "valid").mean()) for lam in lambdas}
    lam = max(lambdas, key=by_lambda.__getitem__)
    e = ease(seqs, lam)
    row("ease", e, **{"lambda": lam, "validation_by_lambda": [[v, by_lambda[v]] for v in lambdas]})
    fused, chosen = best([berts[0], mf])
    row("fused bert + mf", fused, **chosen)
    if len(berts) > 1:
        fused, chosen = best([average, mf])
        row(f"fused bert ({len(berts)} runs averaged) + mf", fused, **chosen)
    fused, chosen = best([berts[0], mf, e])
    row("fused bert + mf + ease", fused, **chosen)
    return {"runs": [str(r) for r in roots], "n_users": {s: int(np.count_nonzero(np.diff(seqs.target_matrix(s).indptr)))
                                                          for s in EVAL_SPLITS},
            "ease_lambdas": lambdas, "grid_size": grid_size, "rows": rows}


def table(out: dict[str, Any]) -> str:
    lines = ["| model | valid NDCG@10 | test NDCG@10 | / MF [95% CI] | chosen on validation |", "|---|---|---|---|---|"]
    for r in out["rows"]:
        chosen = (f"weights {', '.join(f'{w:.2f}' for w in r['weights'])}" if "weights" in r else
                  f"lambda {r['lambda']:g}" if "lambda" in r else "")
        lines.append(f"| {r['model']} | {r['valid_ndcg@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{r['ratio_to_mf']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {chosen} |")
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    ratios = np.array([r["ratio_to_mf"] for r in rows])
    err = np.abs(np.array([r["ci95"] for r in rows]).T - ratios)
    ax.barh(y, ratios, xerr=err, color="tab:blue", alpha=0.7, capsize=3)
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_yticks(y, [r["model"] if len(r["model"]) < 48 else r["model"][:45] + "..." for r in rows])
    ax.set_xlabel("test NDCG@10 / MF (95% paired-bootstrap interval)")
    ax.set_xlim(min(0.8, ratios.min() - 0.05), max(1.25, (ratios + err[1]).max() + 0.02))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="finished runs' dataset folders (a quality run's <workdir>/<dataset>); MF from the first")
    parser.add_argument("--ease-lambdas", default="50,300", help="EASE's L2 weights to choose from on validation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = params_from_args(args)
    try:
        lambdas = [float(v) for v in args.ease_lambdas.split(",")]
    except ValueError:
        parser.error(f"--ease-lambdas: expected numbers separated by commas, got {args.ease_lambdas!r}")
    if not lambdas or min(lambdas) <= 0:
        parser.error(f"--ease-lambdas: expected positive numbers, got {args.ease_lambdas!r}")
    missing = [str(r / p) for r in args.runs for p in (f"features/{SEQUENCES}", f"mf/{FILE_NAME}", f"bert/{FILE_NAME}")
               if not (r / p).exists()]
    if missing:
        parser.error(f"--runs: not a finished run's dataset folder, missing {', '.join(missing)}")
    try:
        out = run(args.runs, lambdas, params.fusion.grid_size, params.evaluation.batch_size)
    except EnsembleError as e:
        parser.error(str(e))
    out["command"] = " ".join(["python -m benchmarks.ensembles", *sys.argv[1:]])
    print(table(out))
    save(out, args.out, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
