"""The recommendation service: FastAPI + onnxruntime + numpy; nothing from training.

    python -m serving.app --bundle artifacts/bundle                 # a local bundle
    python -m serving.app --model-name recforge-recommender          # the registry's champion
        [--tracking-uri http://127.0.0.1:5000] [--poll-seconds 30]

Endpoints: POST /recommend, POST /events, POST /items (admin), POST /admin/reload (admin),
GET /items/{id}/similar, GET /health, GET /ready, GET /metrics, GET /docs.

The parts: `schemas` (request bodies), `service` (state, swap, ranking), `batching`, `cache`,
`http` (routes and the ASGI guard), `bundle` / `bundle_format` (the model files), `champion`
(the registry), `store` (events, items, impressions), `impressions` (logging off the hot path),
`online` (online metrics and their CLI), `retrieval` (exact and FAISS top-k).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from serving.bundle_format import MANIFEST
from serving.http import create_app
from serving.retrieval import ANN_KINDS, RetrievalConfig
from serving.service import Settings
from serving.store import store_arg


DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, str, int]:
    """Settings from the command line; every default is `Settings`' own."""
    d, r = Settings(), RetrievalConfig()
    p = argparse.ArgumentParser(description="The RecForge recommendation service.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a local bundle folder (artifacts/bundle)")
    src.add_argument("--model-name", help="serve models:/<name>@champion from the MLflow registry")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    p.add_argument("--cache-dir", type=Path, default=d.cache_dir, help="downloaded bundles (and the ANN indexes beside)")
    p.add_argument("--db", type=store_arg, default=d.db,
                   help="the event store: a SQLite file, or postgresql://user@host/db shared by several replicas")
    p.add_argument("--poll-seconds", type=float, default=d.poll_seconds, help="how often to look for a new champion")
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="extra wait for a fuller batch (0: batch only what is already queued)")
    p.add_argument("--threads", type=int, default=d.threads, help="onnxruntime threads per call")
    p.add_argument("--batch-workers", type=int, default=d.batch_workers, help="ONNX calls in flight at once (about the cores)")
    p.add_argument("--cache-mb", type=float, default=d.cache_mb, help="memory for cached answers, MB (0 = no cache)")
    p.add_argument("--catalog-poll-seconds", type=float, default=d.catalog_poll_seconds,
                   help="how often items added by other processes on --db are picked up (0 = never)")
    p.add_argument("--impression-rate", type=float, default=d.impression_rate,
                   help="share of /recommend answers to a user logged as impressions (0 = none)")
    p.add_argument("--impression-queue", type=int, default=d.impression_queue,
                   help="impressions waiting for the store before more are dropped (and counted)")
    p.add_argument("--attribution-seconds", type=float, default=d.attribution_seconds,
                   help="an event this long after a list at most counts for it (online metrics)")
    p.add_argument("--online-refresh-seconds", type=float, default=d.online_refresh_seconds,
                   help="how often /metrics' online metrics are recomputed (0 = never)")
    p.add_argument("--online-window-seconds", type=float, default=d.online_window_seconds,
                   help="the period /metrics' online metrics cover")
    p.add_argument("--challenger", choices=["ab", "shadow"], default=d.challenger,
                   help="serve a challenger beside the champion: ab (a stable share of users) or shadow (ranked, "
                        "logged, never shown)")
    p.add_argument("--challenger-bundle", type=Path, default=d.challenger_bundle,
                   help="the challenger's local bundle (with --model-name: the registry's @challenger alias)")
    p.add_argument("--challenger-fraction", type=float, default=d.challenger_fraction,
                   help="ab: the share of users answered by the challenger; shadow: the share of requests it ranks")
    p.add_argument("--exact-max-items", type=int, default=r.exact_max_items,
                   help="exact top-k up to this catalogue size, FAISS beyond")
    p.add_argument("--ann", choices=ANN_KINDS, default=r.ann, help="FAISS index beyond --exact-max-items")
    p.add_argument("--nprobe", type=int, default=r.nprobe, help="IVF lists searched per query")
    p.add_argument("--ef-search", type=int, default=r.ef_search, help="HNSW search breadth")
    p.add_argument("--int8-table", action="store_true", help="score against an INT8 copy of the item vectors")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    if not 0 <= a.impression_rate <= 1:
        p.error(f"--impression-rate must be in [0, 1], got {a.impression_rate}")
    if not 0 <= a.challenger_fraction <= 1:
        p.error(f"--challenger-fraction must be in [0, 1], got {a.challenger_fraction}")
    if a.challenger and a.bundle is not None and a.challenger_bundle is None:
        p.error("--challenger with --bundle needs --challenger-bundle (the registry's alias needs --model-name)")
    if a.challenger_bundle is not None and not a.challenger:
        p.error("--challenger-bundle needs --challenger ab|shadow")
    if a.attribution_seconds <= 0 or a.online_window_seconds <= 0 or a.impression_queue < 1:
        p.error("--attribution-seconds, --online-window-seconds and --impression-queue must be positive")
    # Checked here, not when the service starts loading it (a startup failure, not a usage error).
    for option, bundle in (("--bundle", a.bundle), ("--challenger-bundle", a.challenger_bundle)):
        if bundle is not None and not (bundle / MANIFEST).is_file():
            p.error(f"{option} {bundle}: not a bundle (no {MANIFEST}); the export stage writes one, e.g. artifacts/bundle")
    settings = Settings(bundle=a.bundle, model_name=a.model_name, tracking_uri=a.tracking_uri, cache_dir=a.cache_dir,
                        db=a.db, admin_token=os.environ.get("RECFORGE_ADMIN_TOKEN"), poll_seconds=a.poll_seconds,
                        max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, batch_workers=max(1, a.batch_workers),
                        threads=a.threads, cache_mb=a.cache_mb, catalog_poll_seconds=a.catalog_poll_seconds,
                        index_cache_dir=a.cache_dir.parent / "ann", impression_rate=a.impression_rate,
                        impression_queue=a.impression_queue, attribution_seconds=a.attribution_seconds,
                        online_refresh_seconds=a.online_refresh_seconds, challenger=a.challenger,
                        challenger_bundle=a.challenger_bundle, challenger_fraction=a.challenger_fraction, online_window_seconds=a.online_window_seconds,
                        retrieval=RetrievalConfig(exact_max_items=a.exact_max_items, ann=a.ann, nprobe=a.nprobe,
                                                  ef_search=a.ef_search, int8=a.int8_table, threads=a.threads))
    return settings, a.host, a.port


def main() -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, host, port = settings_from_args()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
