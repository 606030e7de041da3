"""Where bundles come from: the MLflow registry's champion, with the last good one kept on disk
so the service starts when the registry is unreachable.

A download is checked against the sha256 of `bundle.json` the registry recorded for the version
(and each file against the manifest). A cached bundle that no longer verifies is downloaded again
when the registry answers."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from serving.bundle_format import MANIFEST, BundleError, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    version: str
    artifact: str  # where the bundle is stored (`runs:/<run>/bundle`)
    sha256: str | None  # of its bundle.json, as registered


def current(tracking_uri: str, model_name: str, alias: str = "champion") -> Champion:
    """The version behind `models:/<name>@<alias>` (`champion`, or `challenger`)."""
    import os

    # MLflow's client retries with backoff for minutes by default; a service must fall back to
    # its cached bundle promptly when the registry is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    version = client.get_model_version_by_alias(model_name, alias)
    artifact = version.tags.get("bundle_artifact") or f"runs:/{version.run_id}/bundle"
    return Champion(str(version.version), artifact, version.tags.get("bundle_sha256"))


def fetch(tracking_uri: str, cache_dir: Path, champion: Champion) -> Path:
    """The champion's verified bundle in `cache_dir/v<version>`, downloaded unless a good copy is
    already there."""
    import mlflow.artifacts

    target = cache_dir / f"v{champion.version}"
    if (target / MANIFEST).exists():
        try:
            verify(target, champion.sha256)
            return target
        except BundleError as exc:
            log.warning("the cached bundle of version %s is corrupt (%s): downloading it again", champion.version, exc)
    tmp = cache_dir / f".v{champion.version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(artifact_uri=champion.artifact, dst_path=str(tmp), tracking_uri=tracking_uri)
    downloaded = tmp / "bundle" if (tmp / "bundle" / MANIFEST).exists() else tmp
    verify(downloaded, champion.sha256)  # refused before it can replace anything
    shutil.rmtree(target, ignore_errors=True)
    downloaded.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def remember(cache_dir: Path, champion: Champion, path: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "last_good.json").write_text(json.dumps(
        {"version": champion.version, "path": str(path), "sha256": champion.sha256}))


def last_good(cache_dir: Path) -> tuple[str, Path] | None:
    """(version, path) of the last bundle that served, verified; None when there is none.
    Raises `BundleError` when it no longer verifies."""
    marker = cache_dir / "last_good.json"
    if not marker.exists():
        return None
    data = json.loads(marker.read_text())
    path = Path(data["path"])
    verify(path, data.get("sha256"))
    return str(data["version"]), path
