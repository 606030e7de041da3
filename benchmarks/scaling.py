"""The data stages at scale: validate, features, train_mf and evaluate on synthetic data of
growing size, each stage in its own process, wall time and peak memory.

    python -m benchmarks.scaling --sizes 1000000,10000000 --engine default --out s.json
    python -m benchmarks.scaling --sizes 1000000,10000000 --engine default,spark --stages validate,features --out s.json

For each size N, synthetic interactions are generated once (timed apart, not a stage) with 5 %
as many users as interactions and 1 % as many items (100M -> 5M users, 1M items), and written as
a Parquet `files` source. Then the pipeline's own stages run on it, each in a fresh Python
process so that its peak RSS (`VmHWM`) is its own: `validate` (Great Expectations, the snapshot),
`features`, `train_mf` and `evaluate` (popularity and MF, full ranking, `--max-users` users per
split). Output:

    {"ENGINE": {"N": {"STAGE": {"seconds": ..., "peak_rss_mb": ...}}},
     "generation": {"N": {"seconds": ..., "users": ..., "items": ...}}, "growth": {...}}

With several engines (`--engine default,spark`), each runs the stages on the same source, one
after the other, and `parity` records whether their outputs agree at each size (validation
verdicts and counts, the snapshot's rows, every feature file). A Spark stage's `peak_rss_mb` adds its JVM's peak (`jvm_peak_rss_mb`, where
Spark's local executors run) to the Python process's: an upper bound of the two at any moment.

`growth` is each stage's seconds at a size over its seconds at the previous size (near-linear
cost: the ratio stays near the ratio of the sizes). The plot beside the JSON shows seconds and
memory against N. A stage that fails or exceeds `--stage-timeout` is recorded with its error and
the stages after it are skipped at that size. `--corrupt` also validates a corrupted copy of
each size (about 300 unknown item ids, 200 negative timestamps, 2 % of the rows repeated) and
records what was planted beside the checks that refused it (`validate_corrupted`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.common import children_peak_rss_mb, peak_rss_mb, save
from components.cli import add_params_arguments, params_from_args, run_main
from components.config import Params
from components.pipeline import Artifacts

STAGES = ("validate", "features", "train_mf", "evaluate")
ENGINES = ("default", "spark")


def synthetic_config(params, n_interactions: int):
    """Users 5 % and items 1 % of the interactions (at least 100 and 50). An hour between a
    user's events: at a day, the longest histories of the heavy tail run past today and
    validation refuses them as future timestamps."""
    n_items = max(50, n_interactions // 100)
    return dataclasses.replace(
        params.data.synthetic,
        n_users=max(100, n_interactions // 20),
        n_items=n_items,
        n_interactions=n_interactions,
        n_topics=max(5, n_items // 500),
        mean_gap_seconds=3600.0,
    )


def source_settings(source: Path, max_users: int) -> list[str]:
    """The settings that read the generated Parquet source and score popularity and MF."""
    return ["data.source=files", f"data.path={source}", "data.files.interactions=interactions",
            "data.files.items=items.parquet", "data.files.columns.user_id=user_id",
            "data.files.columns.item_id=item_id", "data.files.columns.timestamp=timestamp",
            "data.files.columns.weight=null", "data.files.columns.split=null", "data.files.item_id_column=item_id",
            "data.files.text_columns=[text]", "evaluation.models=[popularity, mf]",
            f"evaluation.max_users={max_users}"]


def generate_part(params: Params, n: int, source: Path, chunk: int, part: int) -> dict[str, Any]:
    """Part `part` of the source for `n` interactions: `interactions/part-NNN.parquet` (and
    `items.parquet` with part 0). Beyond `chunk` (the generator holds ~450 bytes an
    interaction), each part is its own draw (seed + part) over the same item ids, with its own
    users: the same part is the same file every time."""
    from components.datasets import RawDataset, normalize
    from components.synthetic import generate

    cfg = synthetic_config(params, n)
    parts = -(-n // chunk)
    part_cfg = dataclasses.replace(cfg, n_users=cfg.n_users // parts, n_interactions=n // parts)
    start = time.perf_counter()
    inter, items = generate(part_cfg, params.seed + part)
    seconds = time.perf_counter() - start
    inter, items = normalize(RawDataset(inter, items, "synthetic", f"{n} synthetic"))
    if parts > 1:  # users of different parts are different people
        inter = inter.with_columns(pl.col("user_id").str.replace("^u", f"u{part}-"))
    (source / "interactions").mkdir(parents=True, exist_ok=True)
    inter.select("user_id", "item_id", "timestamp").write_parquet(source / "interactions" / f"part-{part:03d}.parquet")
    if part == 0:
        items.select("item_id", "text").write_parquet(source / "items.parquet")
    return {"seconds": seconds, "interactions": inter.height, "users": part_cfg.n_users, "items": cfg.n_items}


def generate_source(args: argparse.Namespace, n: int, source: Path) -> dict[str, Any]:
    """Every part, each in its own process (a process that generated several kept GBs of each)."""
    parts = -(-n // args.chunk)
    shutil.rmtree(source / "interactions", ignore_errors=True)
    total: dict[str, Any] = {"seconds": 0.0, "interactions": 0, "users": 0, "peak_rss_mb": 0.0, "files": parts}
    for part in range(parts):
        got = run_stage(args, list(args.overrides), source, "generate", [f"--n={n}", f"--part={part}"])
        if "error" in got:
            return got
        total.update(seconds=total["seconds"] + got["seconds"], interactions=total["interactions"] + got["interactions"],
                     users=total["users"] + got["users"], items=got["items"],
                     peak_rss_mb=max(total["peak_rss_mb"], got["peak_rss_mb"]))
        if parts > 1:
            print(f"  generated part {part + 1}/{parts} in {got['seconds']:.1f} s", flush=True)
    return total


def corrupt_source(source: Path, target: Path) -> dict[str, int]:
    """A copy of `source` with about 300 unknown item ids, 200 negative timestamps and 2 % of
    its rows repeated, written in one streaming pass (what validation must refuse by name)."""
    scan = pl.scan_parquet(source / "interactions" / "*.parquet")
    n = scan.select(pl.len()).collect().item()
    unknown_every, negative_every = max(1, n // 300), max(1, n // 200)
    row = pl.col("row")
    lf = scan.with_row_index("row").with_columns(
        item_id=pl.when(row % unknown_every == 0).then(pl.lit("unknown-") + row.cast(pl.Utf8))
        .otherwise(pl.col("item_id")),
        timestamp=pl.when(row % negative_every == 1).then(-pl.col("timestamp")).otherwise(pl.col("timestamp")),
    )
    (target / "interactions").mkdir(parents=True, exist_ok=True)
    pl.concat([lf, lf.filter(row % 50 == 2)]).drop("row").sink_parquet(target / "interactions" / "part-0.parquet")
    shutil.copy(source / "items.parquet", target / "items.parquet")
    written = pl.scan_parquet(target / "interactions" / "part-0.parquet").select(
        unknown_items=pl.col("item_id").str.starts_with("unknown-").sum(),
        negative_timestamps=(pl.col("timestamp") < 0).sum()).collect().row(0, named=True)
    return {"rows": n, **written, "repeated_rows": len(range(2, n, 50))}


def validate_corrupt_child(params: Params, root: Path) -> None:
    """Runs in its own process: validation of the corrupted source (settings already point at
    it), what it refused by name, and its time and peak RSS as JSON."""
    from components.validate import validate

    start = time.perf_counter()
    result = validate(params.data, params.validation, params.seed, root / "validation", root / "data")
    print(json.dumps({"seconds": time.perf_counter() - start, **memory(), "success": result.success,
                      "failed_checks": {f.check: {"unexpected_count": f.unexpected_count,
                                                  "examples": [str(e) for e in f.examples]}
                                        for f in result.failures}}))


def generate_child(params: Params, n: int, source: Path, chunk: int, part: int) -> None:
    """Runs in its own process (generating takes GBs; the parent must not keep them while the
    stages run): writes one part of the source, prints what it generated as JSON."""
    print(json.dumps({**generate_part(params, n, source, chunk, part), "peak_rss_mb": peak_rss_mb()}))


def memory() -> dict[str, float]:
    """This process's peak RSS plus that of the JVM a Spark session started (still running)."""
    jvm = children_peak_rss_mb()
    return {"peak_rss_mb": peak_rss_mb() + jvm, **({"jvm_peak_rss_mb": jvm} if jvm else {})}


def child(params: Params, root: Path, stage: str) -> None:
    """Runs in its own process: one stage on `root`, then its time and peak RSS as JSON."""
    from components import pipeline

    start = time.perf_counter()
    pipeline.execute(pipeline.STAGE[stage], params, Artifacts(root))
    out = {"seconds": time.perf_counter() - start, **memory()}
    if stage == "train_mf":  # where its time goes: the two fits and the two fold-ins
        out["phase_seconds"] = json.loads((Artifacts(root).mf / "model.json").read_text())["phase_seconds"]
    print(json.dumps(out))


def run_stage(args: argparse.Namespace, overrides: list[str], root: Path, stage: str,
              extra: list[str] = ()) -> dict[str, Any]:
    """`stage` on `root` in its own process ("generate": a part of the source, `root`)."""
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--params", str(args.params), "--child", str(root),
           "--stage", stage, "--chunk", str(args.chunk), *extra]
    for f in args.override_files:
        cmd += ["--params-overrides", str(f)]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.stage_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within --stage-timeout {args.stage_timeout} s",
                "wall_seconds": time.perf_counter() - start}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "wall_seconds": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"the stage's process printed no result: {lines[-1] if lines else '(nothing)'}",
                "wall_seconds": time.perf_counter() - start}


def differing_files(left: Path, right: Path) -> list[str]:
    """The files of two output folders that differ (Parquet by table, npz array by array, the
    rest byte for byte), or are in one only: [] when the folders are the same."""
    import numpy as np

    names = {p.name for p in left.iterdir()} | {p.name for p in right.iterdir()}
    differ = []
    for name in sorted(names):
        a, b = left / name, right / name
        if not (a.is_file() and b.is_file()):
            same = False
        elif name.endswith(".parquet"):
            ta, tb = pl.read_parquet(a), pl.read_parquet(b)
            same = ta.schema == tb.schema and ta.equals(tb)
        elif name.endswith(".npz"):
            with np.load(a) as za, np.load(b) as zb:
                same = sorted(za.files) == sorted(zb.files) and all(
                    za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]) for k in za.files)
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            differ.append(name)
    return differ


def verdicts(summary: Path) -> list[tuple[Any, ...]]:
    """Each check's name, verdict and counts from a validation summary (a type check's observed
    type is named by each engine in its own terms)."""
    checks = json.loads(summary.read_text())["checks"]
    return [(c["check"], c["success"], c["unexpected_count"],
             None if c["expectation"].endswith("type_list") else c["observed"]) for c in checks]


def parity(workdir: Path, engines: list[str], n: int) -> dict[str, Any]:
    """Whether the engines' outputs at size `n` agree: validation verdicts and counts (on the
    corrupted copy too), the snapshot's rows (their order is each reader's), every feature file."""
    roots = [Artifacts(workdir / e / str(n)) for e in engines]
    out: dict[str, Any] = {}
    for key, folders in (("same_verdicts", roots), ("same_verdicts_corrupted",
                                                   [Artifacts(workdir / e / f"{n}-corrupt") for e in engines])):
        found = [verdicts(r.validation / "summary.json") for r in folders if (r.validation / "summary.json").exists()]
        if len(found) == len(folders):
            out[key] = all(v == found[0] for v in found[1:])
    if all(r.data.joinpath("interactions.parquet").exists() for r in roots):
        snaps = [pl.read_parquet(r.data / "interactions.parquet") for r in roots]
        out["same_snapshot_rows"] = all(s.schema == snaps[0].schema and s.sort(pl.all()).equals(snaps[0].sort(pl.all()))
                                        for s in snaps[1:])
    if all(r.features.is_dir() for r in roots):
        out["differing_feature_files"] = sorted({f for r in roots[1:] for f in differing_files(roots[0].features, r.features)})
    return out


def growth(per_size: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """{"N0->N1": {stage: seconds(N1) / seconds(N0)}} for consecutive sizes both measured."""
    sizes = sorted(per_size, key=int)
    out: dict[str, dict[str, float]] = {}
    for lo, hi in zip(sizes, sizes[1:]):
        row = {s: per_size[hi][s]["seconds"] / per_size[lo][s]["seconds"] for s in STAGES
               if "seconds" in per_size[lo].get(s, {}) and "seconds" in per_size[hi].get(s, {})}
        out[f"{lo}->{hi}"] = {"size_ratio": int(hi) / int(lo), **row}
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for engine in [e for e in ENGINES if e in out]:
        for stage in STAGES:
            points = sorted((int(n), row[stage]) for n, row in out[engine].items() if "seconds" in row.get(stage, {}))
            if not points:
                continue
            xs = [n for n, _ in points]
            axes[0].plot(xs, [r["seconds"] for _, r in points], marker="o", label=f"{stage} ({engine})")
            axes[1].plot(xs, [r["peak_rss_mb"] / 1024 for _, r in points], marker="o", label=f"{stage} ({engine})")
    for ax, label in zip(axes, ("seconds", "peak RSS (GB)")):
        ax.set(xscale="log", yscale="log", xlabel="interactions", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Data stages at scale, each in its own process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated interaction counts")
    parser.add_argument("--engine", default="default",
                        help=f"the data engine, or several comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--max-users", type=int, default=100_000, help="users scored per split by evaluate")
    parser.add_argument("--stage-timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/scaling"))
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--child", type=Path, metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=10_000_000,
                        help="interactions generated at a time, one Parquet file each (10M take ~4.5 GB)")
    parser.add_argument("--reuse", action="store_true",
                        help="use the source an earlier call generated in --workdir (and the stages' outputs "
                             "there: --stages evaluate alone scores what an earlier call trained)")
    parser.add_argument("--corrupt", action="store_true",
                        help="also validate a corrupted copy of each size (unknown items, negative timestamps, "
                             "2%% repeated rows): it must be refused naming those checks")
    parser.add_argument("--stage", choices=(*STAGES, "generate", "validate_corrupt"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.stage == "generate":
        generate_child(params_from_args(args), args.n, args.child, args.chunk, args.part)
        return 0
    if args.child and args.stage == "validate_corrupt":
        validate_corrupt_child(params_from_args(args), args.child)
        return 0
    if args.child:
        child(params_from_args(args), args.child, args.stage)
        return 0
    if args.out is None:
        parser.error("--out is required")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := sorted(set(stages) - set(STAGES)):
        parser.error(f"unknown stages: {', '.join(unknown)} (of {', '.join(STAGES)})")
    try:
        sizes = sorted(int(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or sizes[0] < 1000:
        parser.error("--sizes must be at least 1000 interactions each")

    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or (unknown := sorted(set(engines) - set(ENGINES))):
        parser.error(f"--engine: unknown engines {', '.join(unknown)} (of {', '.join(ENGINES)})")

    out: dict[str, Any] = {**{e: {} for e in engines}, "generation": {},
                           "settings": {"command": " ".join(["python -m benchmarks.scaling", *sys.argv[1:]]),
                                        "overrides": args.overrides, "max_users": args.max_users}}
    for n in sizes:
        source = args.workdir / "source" / str(n)
        record = source / "generation.json"
        if args.reuse and record.exists():
            generated = {**json.loads(record.read_text()), "reused": True}
            print(f"{n:>12,} interactions: reusing the source generated in {source}", flush=True)
        else:
            generated = generate_source(args, n, source)
            if "error" in generated:
                raise SystemExit(f"generating {n} interactions failed: {generated['error']}")
            record.write_text(json.dumps(generated))
            print(f"{n:>12,} interactions generated in {generated['seconds']:.1f} s, peak RSS "
                  f"{generated['peak_rss_mb']:.0f} MB", flush=True)
        out["generation"][str(n)] = generated
        corrupt = args.workdir / "source-corrupt" / str(n)
        planted = corrupt_source(source, corrupt) if args.corrupt else None
        for engine in engines:
            out[engine][str(n)] = run_size(args, engine, n, source, stages, planted and (corrupt, planted))
            out["growth" if len(engines) == 1 else f"growth_{engine}"] = growth(out[engine])
            save(out, args.out, plot)  # after every size: a long run keeps what it measured
        shutil.rmtree(corrupt, ignore_errors=True)
        if len(engines) > 1:
            out.setdefault("parity", {})[str(n)] = agreed = parity(args.workdir, engines, n)
            print(f"{n:>12,} parity of {' and '.join(engines)}: {agreed}", flush=True)
            save(out, args.out, plot)
    for key in [k for k in out if k.startswith("growth")]:
        for span, ratios in out[key].items():
            print(f"{key} {span}: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    return 0


def run_size(args: argparse.Namespace, engine: str, n: int, source: Path, stages: list[str],
             corrupted: tuple[Path, dict[str, int]] | None) -> dict[str, Any]:
    """The stages of one engine on the source of size `n`, and validation of its corrupted copy
    (`corrupted`: its folder and what was planted there) where given."""
    root = args.workdir / engine / str(n)
    engine_settings = [f"data.engine={engine}"]
    overrides = [*args.overrides, *engine_settings, *source_settings(source, args.max_users)]
    row: dict[str, Any] = {}
    for stage in stages:
        if any("error" in row.get(s, {}) for s in stages[:stages.index(stage)]):
            row[stage] = {"error": "skipped: an earlier stage failed"}
            continue
        row[stage] = run_stage(args, overrides, root, stage)
        got = row[stage]
        print(f"{n:>12,} {engine:<8}{stage:<9} " + (f"{got['seconds']:8.1f} s  peak RSS {got['peak_rss_mb']:8.0f} MB"
                                                    if "seconds" in got else f"FAILED: {got['error']}"), flush=True)
    if corrupted:
        corrupt, planted = corrupted
        got = run_stage(args, [*args.overrides, *engine_settings, *source_settings(corrupt, args.max_users)],
                        args.workdir / engine / f"{n}-corrupt", "validate_corrupt")
        row["validate_corrupted"] = {"planted": planted, **got}
        print(f"{n:>12,} {engine:<8}corrupted: " + (f"refused {sorted(got['failed_checks'])} in {got['seconds']:.1f} s, "
                                                    f"peak RSS {got['peak_rss_mb']:.0f} MB" if "seconds" in got
                                                    else f"FAILED: {got['error']}"), flush=True)
    return row


if __name__ == "__main__":
    run_main(main)
