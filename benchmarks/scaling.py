"""Feature building at scale: wall time and peak memory on 1M and 10M synthetic interactions.

    python -m benchmarks.scaling --out scaling.json [--sizes 1000000,10000000]

Each size is generated once (not timed) into a snapshot, then feature building runs in a fresh
Python process so that its peak RSS is its own. Output:
`{"features": {"1000000": {"seconds": ..., "peak_rss_mb": ...}, "10000000": {...}},
  "generation": {"1000000": {"seconds": ...}, ...}}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import peak_rss_mb, write_json
from components.cli import add_params_arguments, run_main
from components.config import load_params
from components.pipeline import Artifacts


def synthetic_config(params, n_interactions: int):
    """Scale users, items and topics with the interaction count (about 33 per user)."""
    n_items = max(1_000, n_interactions // 100)
    return dataclasses.replace(
        params.data.synthetic,
        n_users=max(2_000, n_interactions // 33),
        n_items=n_items,
        n_interactions=n_interactions,
        n_topics=max(20, n_items // 500),
    )


def generate_snapshot(params_path: Path, overrides: list[str], n: int, data_dir: Path) -> float:
    from components.datasets import RawDataset, normalize
    from components.synthetic import generate

    params = load_params(params_path, overrides)
    start = time.perf_counter()
    inter, items = generate(synthetic_config(params, n), params.seed)
    seconds = time.perf_counter() - start
    data_dir.mkdir(parents=True, exist_ok=True)
    inter, items = normalize(RawDataset(inter, items, "synthetic", f"{n} synthetic"))
    inter.write_parquet(data_dir / "interactions.parquet")
    items.write_parquet(data_dir / "items.parquet")
    return seconds


def child(params_path: Path, overrides: list[str], root: Path) -> None:
    """Runs in its own process: the features stage on the snapshot under `root`, then time and
    peak RSS as JSON."""
    from components import pipeline

    params = load_params(params_path, overrides)
    start = time.perf_counter()
    result = pipeline.execute(pipeline.STAGE["features"], params, pipeline.Artifacts(root))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "n_interactions": result.n_interactions}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/scaling"))
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--child", type=Path, metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.params, args.overrides, args.child)
        return 0
    if args.out is None:
        parser.error("--out is required")

    results: dict[str, dict[str, dict[str, float]]] = {"features": {}, "generation": {}}
    for n in [int(s) for s in args.sizes.split(",")]:
        data_dir = Artifacts(args.workdir / str(n)).data
        gen_seconds = generate_snapshot(args.params, args.overrides, n, data_dir)
        results["generation"][str(n)] = {"seconds": gen_seconds}
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--params", str(args.params)]
        for o in args.overrides:
            cmd += ["--set", o]
        cmd += ["--child", str(args.workdir / str(n))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        results["features"][str(n)] = measured
        print(
            f"{n:>11,} interactions: generated in {gen_seconds:.1f} s; features in "
            f"{measured['seconds']:.1f} s, peak RSS {measured['peak_rss_mb']:.0f} MB"
        )
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    run_main(main)
