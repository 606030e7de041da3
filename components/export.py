"""The export stage: the serving bundle, assembled from the variants compression chose and MF.

What a bundle holds, and how it is verified, is the contract in `serving/bundle_format.py`; how
each graph is built is in `components/onnx_graphs.py`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.config import ExportConfig, ValidationConfig
from serving.bundle_format import (
    MF_INPUTS,
    MF_OUTPUTS,
    PADDING_RULE,
    SEQUENCE_INPUTS,
    SEQUENCE_OUTPUTS,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    bundle_sha256,
    title,
    write_manifest,
)


@dataclass(frozen=True)
class BundleResult:
    bundle_sha256: str
    sequence_variant: str
    text_variant: str | None
    n_items: int
    n_files: int
    size_mb: float
    # ONNX against PyTorch (sequence model) and numpy (MF) on validation users.
    parity: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        return {"size_mb": self.size_mb, "n_items": self.n_items, "parity": self.parity}

    def describe(self) -> str:
        return (f"bundle {self.bundle_sha256[:12]}: sequence {self.sequence_variant}, text encoder "
                f"{self.text_variant or 'none'}, {self.n_items} items, {self.n_files} files, {self.size_mb:.1f} MB\n"
                f"parity: {json.dumps(self.parity)}")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "recforge"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def export_bundle(features_dir: Path, bert_dir: Path, mf_dir: Path, compress_dir: Path, out_dir: Path,
                  cfg: ExportConfig, rules: ValidationConfig) -> BundleResult:
    """Assemble the serving bundle from the compression stage's chosen variants and MF. `rules`:
    what validation accepts of an interaction, which the service applies to live events."""
    import polars as pl
    import scipy.sparse as sp
    import torch

    from components.bert.model import load_model
    from components.factors import FILE_NAME, FactorModel
    from components.onnx_graphs import check_mf_parity, export_mf

    report = json.loads((compress_dir / "report.json").read_text())
    model = load_model(bert_dir / "model")
    k = min(cfg.k, model.cfg.n_items)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    seq_variant = report["sequence"]["variant"]
    shutil.copy2(compress_dir / "sequence" / f"{seq_variant}.onnx", out_dir / "sequence.onnx")
    text = report.get("text_encoder")
    if text:
        shutil.copy2(compress_dir / "text_encoder" / f"{text['variant']}.onnx", out_dir / "text_encoder.onnx")
        shutil.copytree(compress_dir / "text_encoder" / "tokenizer", out_dir / "tokenizer")

    # Item vectors the graph scores against: the service needs them too (similar items,
    # explanations, new items appended to the catalogue, ANN indexes).
    with torch.no_grad():
        item_vectors = model.output_items(model.item_representations()).float().numpy()
    np.save(out_dir / "item_vectors.npy", item_vectors)

    items = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")
    counts = np.asarray((sp.load_npz(features_dir / "train_matrix.npz") > 0).sum(axis=0)).ravel()
    (out_dir / "items.json").write_text(json.dumps({
        "titles": [title(t) for t in items["text"].fill_null("").to_list()],
        "popularity": counts.astype(int).tolist(),
    }))

    mf_parity = None
    mf_factors = mf_dir / FILE_NAME
    if mf_factors.exists():
        mf = FactorModel.load(mf_factors)
        export_mf(mf.users["test"], mf.items["test"], out_dir / "mf.onnx", k)
        users = pl.read_parquet(features_dir / "user_map.parquet").sort("user_idx")["user_id"].to_list()
        (out_dir / "users.json").write_text(json.dumps(users))
        mf_parity = check_mf_parity(mf.users["test"], mf.items["test"], out_dir / "mf.onnx", min(10, k))

    manifest = write_manifest(out_dir, {
        "k": k,
        "item_ids": items["item_id"].to_list(),
        # The bundle carries its own text encoder (text_encoder.onnx): no training machine's path.
        "model_config": dataclasses.asdict(dataclasses.replace(model.cfg, text_encoder_path=None)),
        "sequence": {"file": "sequence.onnx", "variant": seq_variant, "reason": report["sequence"]["reason"],
                     "inputs": SEQUENCE_INPUTS, "outputs": SEQUENCE_OUTPUTS, "max_len": model.cfg.max_len,
                     "padding": PADDING_RULE},
        "text_encoder": ({"file": "text_encoder.onnx", "variant": text["variant"], "reason": text["reason"],
                          "inputs": TEXT_INPUTS, "outputs": TEXT_OUTPUTS, "tokenizer": "tokenizer/tokenizer.json",
                          "max_length": model.cfg.text_max_length} if text else None),
        "mf": ({"file": "mf.onnx", "inputs": MF_INPUTS, "outputs": MF_OUTPUTS, "users": "users.json"}
               if mf_parity is not None else None),
        "item_vectors": "item_vectors.npy",
        "items": "items.json",
        "validation": report["sequence"]["quality_valid"][seq_variant],
        "data_rules": {"min_timestamp": rules.min_timestamp, "max_future_seconds": rules.max_future_seconds,
                       "weight_min": rules.weight_min, "weight_max": rules.weight_max},
        "package_versions": package_versions(),
    })
    parity = {"sequence": report["sequence"]["deploy_parity"], "mf": mf_parity}
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()) / 1e6
    return BundleResult(bundle_sha256(out_dir), seq_variant, text["variant"] if text else None,
                        len(manifest["item_ids"]), len(manifest["files"]), size, parity)


if __name__ == "__main__":
    from components.pipeline import main

    main("export")
