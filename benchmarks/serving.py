"""The recommendation service under load, over real HTTP.

    python -m benchmarks.serving --data-dir DIR --out serving.json

Starts `python -m serving.app` on localhost with the bundle of a model trained on
movielens-100k (the compression benchmark's work folder is reused when present, else it is
trained), and drives it from this process with an asyncio HTTP client at concurrency 1, 8 and
32 for a fixed time each. Each request sends a real user's recent history (test split) and asks
for the top 10. Reports p50/p95/p99 latency, requests per second and errors per level.

Only the `movielens-100k` scenario is implemented: the synthetic 100k / 1M-item catalogues need
the FAISS retrieval path, which the service does not have yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_json
from benchmarks.presets import overrides_for
from components.cli import add_params_arguments, run_main
from components.config import load_params

log = logging.getLogger("benchmarks.serving")


def ensure_bundle(params, work: Path) -> Path:
    if (work / "bundle" / "bundle.json").exists():
        return work / "bundle"
    from benchmarks.compression import prepare
    from components.compress import compress
    from components.export import export_bundle

    prepare(params, work)
    compress(work / "features", work / "bert", work / "compress", params)
    export_bundle(work / "features", work / "bert", work / "mf", work / "compress", work / "bundle", params)
    return work / "bundle"


def start_server(bundle: Path, port: int, db: Path, threads: int, max_wait_ms: float) -> subprocess.Popen:
    db.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.app", "--bundle", str(bundle), "--port", str(port), "--db", str(db),
         "--threads", str(threads), "--max-wait-ms", str(max_wait_ms),
         "--cache-size", "0"],  # every request computed: no cached answers in the figures
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("service did not start")


async def drive(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            body = payloads[next(counter) % len(payloads)]
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - start) * 1e3)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "rps": len(lat) / elapsed, "errors": errors, "requests": len(lat)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K folder")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/compression/movielens-100k"))
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads in the service")
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params, [*overrides_for("movielens-100k", args.data_dir), *args.overrides])
    bundle = ensure_bundle(params, args.workdir)

    from components.features import load_sequences

    manifest = json.loads((bundle / "bundle.json").read_text())
    ids = manifest["item_ids"]
    seqs = load_sequences(args.workdir / "features")
    L = manifest["sequence"]["max_len"]
    payloads = [json.dumps({"history": [ids[i] for i in h[-L:]], "k": 10}).encode()
                for h in seqs.histories("test", L) if len(h)]

    server = start_server(bundle, args.port, args.workdir / "bench-events.db", args.threads, args.max_wait_ms)
    url = f"http://127.0.0.1:{args.port}/recommend"
    result: dict[str, Any] = {}
    try:
        asyncio.run(drive(url, payloads, 4, 3.0))  # warm-up
        for c in (1, 8, 32):
            result[f"c{c}"] = asyncio.run(drive(url, payloads, c, args.seconds))
            log.info("c%d: %s", c, result[f"c{c}"])
    finally:
        server.terminate()
        server.wait(timeout=20)
    out = {"movielens-100k": {**result, "bundle_variant": manifest["sequence"]["variant"], "users": len(payloads),
                              "seconds_per_level": args.seconds},
           "machine": machine(), "note": "synthetic-100k and synthetic-1m not implemented (no FAISS path yet)"}
    print(json.dumps(out["movielens-100k"], indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    run_main(main)
