"""The recommendation service under load, over real HTTP.

    python -m benchmarks.serving --data-dir DIR --out serving.json

Scenarios, each a `python -m serving.app` process on localhost driven from this process by an
asyncio HTTP client at concurrency 1, 8 and 32 for a fixed time each (p50/p95/p99 latency,
requests per second, errors):

- `movielens-100k`: the bundle of a model trained on movielens-100k (the compression
  benchmark's work folder is reused when present, else it is trained). Ranking in the graph.
- `synthetic-100k`, `synthetic-1m`: the same sequence model over a catalogue grown to 100k / 1M
  items. The extra items stand for items embedded from their text offline: each is a real item's
  vector plus Gaussian noise of half the per-dimension spread, so the table keeps the real
  one's cluster structure. Ranking outside the graph: exact batched product at 100k, FAISS
  (IVF by default) at 1M, where the ANN Recall@10 against exact search is also measured, with
  the service's own retrieval code and settings, on the benchmark's users.

Each request sends a real user's recent history (test split) and asks for the top 10, seen
items excluded; response caching is off, so every request is computed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import dataset_params, save
from components.cli import add_params_arguments, run_main
from serving.retrieval import ANN_KINDS, RetrievalConfig

log = logging.getLogger("benchmarks.serving")


def ensure_bundle(params, work: Path) -> Path:
    """The pipeline's bundle in `work` (built, or reused when up to date)."""
    from benchmarks.compression import prepare

    prepare(params, work)
    return work / "bundle"


def synthetic_catalogue(base: Path, n_items: int, out: Path, seed: int = 0) -> Path:
    """`base` bundle with its catalogue grown to `n_items` (see the module docstring). The
    sequence graph is reused; `sequence.catalog_items` tells the service which items it covers."""
    from serving.bundle_format import write_manifest

    manifest = json.loads((base / "bundle.json").read_text())
    if (out / "bundle.json").exists():
        done = json.loads((out / "bundle.json").read_text())
        same_graph = done["files"].get("sequence.onnx") == manifest["files"]["sequence.onnx"]
        if len(done["item_ids"]) == n_items and same_graph:
            return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vectors = np.load(base / manifest["item_vectors"]).astype(np.float32)
    items = json.loads((base / manifest["items"]).read_text())
    n0, extra = len(vectors), n_items - len(vectors)
    if extra <= 0:
        raise ValueError(f"{n_items} items is not more than the base catalogue's {n0}")
    rng = np.random.default_rng(seed)
    parents = rng.integers(0, n0, extra)
    spread = vectors.std(axis=0, keepdims=True)
    grown = np.concatenate([vectors, vectors[parents] + 0.5 * spread * rng.standard_normal((extra, vectors.shape[1]),
                                                                                          dtype=np.float32)])
    np.save(out / "item_vectors.npy", grown)
    (out / "items.json").write_text(json.dumps({
        "titles": items["titles"] + [f"Synthetic item {j} (near {items['titles'][p]})" for j, p in enumerate(parents)],
        "popularity": items["popularity"] + [0] * extra,
    }))
    for name in ("sequence.onnx", "text_encoder.onnx", "tokenizer"):
        src = base / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.exists():
            shutil.copy2(src, out / name)
    manifest = {**manifest, "item_ids": manifest["item_ids"] + [f"syn-{j:07d}" for j in range(extra)],
                "sequence": {**manifest["sequence"], "catalog_items": n0}, "mf": None,
                "synthetic": {"base_items": n0, "seed": seed, "noise": "0.5 x per-dimension std"}}
    write_manifest(out, {k: v for k, v in manifest.items() if k != "files"})
    return out


def ann_recall(bundle_dir: Path, histories: list[list[int]], retrieval, cache_dir: Path,
               k: int = 10) -> dict[str, float]:
    """Recall@k of the service's ANN index against exact search, seen items excluded, for the
    benchmark's users: the bundle loaded and queried as the service does (with the index it
    built and cached), exact search over the same user vectors."""
    from serving.bundle import Bundle
    from serving.retrieval import exact_topk, recall_at_k

    bundle = Bundle.load(bundle_dir, retrieval=retrieval, index_cache_dir=cache_dir)
    retriever = bundle.retriever
    users, approx, _ = bundle.recommend_batch(histories, histories, k)
    # In chunks: the exact scores of every user against 1M items at once would be 4 GB.
    exact = np.concatenate([exact_topk(users[i:i + 64], bundle.item_vectors, k, histories[i:i + 64])[0]
                            for i in range(0, len(users), 64)])
    return {f"ann_recall@{k}": recall_at_k(approx, exact, k), "index": retriever.label,
            "table_mb": round(retriever.table_bytes / 2**20, 1),
            **({"nlist": retriever.nlist, "nprobe": retrieval.nprobe} if retriever.kind == "ivf" else {}),
            **({"ef_search": retrieval.ef_search} if retriever.kind == "hnsw" else {})}


def start_server(bundle: Path, port: int, db: Path, threads: int, max_wait_ms: float,
                 extra: list[str], keep_db: bool = False) -> subprocess.Popen:
    if not keep_db:
        db.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.app", "--bundle", str(bundle), "--port", str(port), "--db", str(db),
         "--threads", str(threads), "--max-wait-ms", str(max_wait_ms), "--cache-dir", str(db.parent / "bundles"),
         "--cache-mb", "0", *extra],  # every request computed: no cached answers in the figures
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    deadline = time.time() + 900  # a 1M catalogue is hashed, loaded and indexed first
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("service did not start")


async def drive(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` keep-alive connections, each sending `POST /recommend` as soon as its
    previous answer is in, for `seconds`. A minimal HTTP/1.1 client on asyncio streams: the
    load generator shares the cores with the service, and a general-purpose client (aiohttp
    took ~0.3 ms of CPU a request) would take them from the service being measured."""
    # The load generator's own collector pauses would stall every request in flight and show
    # up as service latency: what this process holds is frozen out of the collector's reach.
    gc.collect()
    gc.freeze()
    requests = [b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(p), p) for p in payloads]
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal errors
        reader = writer = None
        while time.perf_counter() < stop:
            request = requests[next(counter) % len(requests)]
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status = int((await reader.readline()).split()[1])
                length = None
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                if length is None:
                    raise ValueError("response without Content-Length")
                await reader.readexactly(length)
                if status != 200:
                    errors += 1
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
            latencies.append((time.perf_counter() - start) * 1e3)
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "rps": len(lat) / elapsed, "errors": errors, "requests": len(lat)}


def load(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(drive(port, payloads, concurrency, seconds))


def run_levels(bundle: Path, payloads: list[bytes], args, db: Path, extra: list[str]) -> dict[str, Any]:
    server = start_server(bundle, args.port, db, args.threads, args.max_wait_ms, extra)
    result: dict[str, Any] = {}
    try:
        load(args.port, payloads, 4, 3.0)  # warm-up
        for c in (1, 8, 32):
            result[f"c{c}"] = load(args.port, payloads, c, args.seconds)
            log.info("%s c%d: %s", bundle.name, c, result[f"c{c}"])
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/ready", timeout=5) as r:
            ready = json.loads(r.read())
        result["retrieval"] = ready["retrieval"]
        if ready.get("index_build_s") is not None:
            result["index_build_s"] = ready["index_build_s"]
    finally:
        server.terminate()
        server.wait(timeout=20)
    return result


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if s in out]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(1, len(scenarios))
    for j, name in enumerate(scenarios):
        xs = np.arange(3) + j * width
        axes[0].bar(xs, [out[name][f"c{c}"]["p99_ms"] for c in (1, 8, 32)], width, label=name)
        axes[1].bar(xs, [out[name][f"c{c}"]["rps"] for c in (1, 8, 32)], width, label=name)
    for ax, title in zip(axes, ("p99 latency (ms)", "requests / s")):
        ax.set_xticks(np.arange(3) + width * (len(scenarios) - 1) / 2, ["c1", "c8", "c32"])
        ax.set_title(title)
    axes[0].axhline(15, color="grey", ls="--", lw=0.8, label="target c8, movielens")
    axes[0].axhline(30, color="grey", ls=":", lw=0.8, label="target c8, 1M items")
    axes[0].legend(fontsize=8)
    fig.suptitle("RecForge service, 2 CPU cores shared with the load generator")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


SCENARIOS = ("movielens-100k", "synthetic-100k", "synthetic-1m")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K folder")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/compression/movielens-100k"))
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads in the service")
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, among {SCENARIOS}")
    parser.add_argument("--ann", choices=ANN_KINDS, default=RetrievalConfig.ann)
    parser.add_argument("--nprobe", type=int, default=RetrievalConfig.nprobe)
    parser.add_argument("--ef-search", type=int, default=RetrievalConfig.ef_search)
    parser.add_argument("--int8-table", action="store_true", help="the service scores an INT8 item table")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose among {SCENARIOS}")
    params = dataset_params(args.params, "movielens-100k", args.data_dir, args.overrides, args.override_files)
    bundle = ensure_bundle(params, args.workdir)

    from components.sequences import load_sequences

    manifest = json.loads((bundle / "bundle.json").read_text())
    ids = manifest["item_ids"]
    seqs = load_sequences(args.workdir / "features")
    L = manifest["sequence"]["max_len"]
    histories = [[int(i) for i in h[-L:]] for h in seqs.histories("test", L) if len(h)]
    payloads = [json.dumps({"history": [ids[i] for i in h], "k": 10}).encode() for h in histories]
    retrieval = RetrievalConfig(ann=args.ann, nprobe=args.nprobe, ef_search=args.ef_search, int8=args.int8_table,
                                threads=args.threads)
    knobs = ["--ann", args.ann, "--nprobe", str(args.nprobe), "--ef-search", str(args.ef_search),
             "--exact-max-items", str(retrieval.exact_max_items), *(["--int8-table"] if args.int8_table else [])]
    run_dir = args.workdir / "serving-bench"
    run_dir.mkdir(parents=True, exist_ok=True)

    out: dict[str, Any] = {}
    for name in scenarios:
        n_items = {"movielens-100k": len(ids), "synthetic-100k": 100_000, "synthetic-1m": 1_000_000}[name]
        target = bundle
        if name != "movielens-100k":
            log.info("%s: building the catalogue", name)
            target = synthetic_catalogue(bundle, n_items, run_dir / name)
        result = run_levels(target, payloads, args, run_dir / "events.db", knobs)
        # After the load test: the recall check's exact search is heavy, kept out of its way.
        if target is not bundle and (n_items > retrieval.exact_max_items or retrieval.int8):
            result.update(ann_recall(target, histories, retrieval, run_dir / "ann"))
        out[name] = {**result, "items": n_items, "bundle_variant": manifest["sequence"]["variant"],
                     "users": len(payloads), "seconds_per_level": args.seconds}
        print(name, json.dumps(out[name], indent=2))
    save(out, args.out, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
