"""Where bundles come from: the MLflow registry's champion, with the last good one kept on disk
so the service starts when the registry is unreachable."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from serving.bundle_format import BundleError, verify

log = logging.getLogger(__name__)


def current(tracking_uri: str, model_name: str) -> tuple[str, str]:
    """(version, bundle artifact URI) of `models:/<name>@champion`."""
    import os

    # MLflow's client retries with backoff for minutes by default; a service must fall back to
    # its cached bundle promptly when the registry is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    version = client.get_model_version_by_alias(model_name, "champion")
    artifact = version.tags.get("bundle_artifact") or f"runs:/{version.run_id}/bundle"
    return str(version.version), artifact


def fetch(tracking_uri: str, model_name: str, cache_dir: Path, version: str, artifact: str) -> Path:
    """Download and verify one version's bundle into `cache_dir/v<version>`; remember it as the
    last good one."""
    import mlflow.artifacts

    target = cache_dir / f"v{version}"
    if not (target / "bundle.json").exists():
        tmp = cache_dir / f".v{version}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=str(tmp), tracking_uri=tracking_uri)
        downloaded = tmp / "bundle" if (tmp / "bundle" / "bundle.json").exists() else tmp
        verify(downloaded)  # refuse before it can become the last good bundle
        shutil.rmtree(target, ignore_errors=True)
        downloaded.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    verify(target)
    return target


def remember(cache_dir: Path, version: str, path: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "last_good.json").write_text(json.dumps({"version": version, "path": str(path)}))


def last_good(cache_dir: Path) -> tuple[str, Path] | None:
    marker = cache_dir / "last_good.json"
    if not marker.exists():
        return None
    data = json.loads(marker.read_text())
    path = Path(data["path"])
    try:
        verify(path)
    except BundleError as exc:
        log.error("the cached bundle is unusable: %s", exc)
        return None
    return str(data["version"]), path
