"""The bundle contract's checks: an edited manifest, a forged one pointing outside the bundle, a
missing file list, a file the manifest uses but does not hash, a download that is not the
registered bundle: each is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.bundle_format import (
    CHECKSUM,
    BundleError,
    _checksum,
    bundle_sha256,
    exclusion_matrix,
    sequence_feeds,
    title,
    verify,
    write_manifest,
)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "sequence.onnx").write_bytes(b"graph")
    (b / "items.json").write_text('{"titles": ["a", "b"]}')
    (b / "item_vectors.npy").write_bytes(b"vectors")
    write_manifest(b, {"item_ids": ["a", "b"], "sequence": {"file": "sequence.onnx"}, "items": "items.json",
                       "item_vectors": "item_vectors.npy"})
    return b


def edit(bundle: Path, change, keep_checksum: bool = False) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    change(manifest)
    if keep_checksum:  # a forger who knows the rule
        manifest[CHECKSUM] = _checksum(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def test_a_fresh_bundle_verifies(bundle):
    assert verify(bundle)["item_ids"] == ["a", "b"]
    assert verify(bundle, bundle_sha256(bundle))["format"] == 1


def test_an_edited_manifest_is_refused(bundle):
    edit(bundle, lambda m: m["item_ids"].reverse())
    with pytest.raises(BundleError, match="edited after export"):
        verify(bundle)


def test_deleting_the_file_list_does_not_switch_the_checks_off(bundle):
    edit(bundle, lambda m: m.pop("files"))
    with pytest.raises(BundleError, match="edited after export"):
        verify(bundle)
    edit(bundle, lambda m: m.update(files={}), keep_checksum=True)
    with pytest.raises(BundleError, match="no file list"):
        verify(bundle)


def test_paths_outside_the_bundle_are_refused(bundle, tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"elsewhere")
    edit(bundle, lambda m: m["files"].update({"../outside.onnx": "0" * 64}), keep_checksum=True)
    with pytest.raises(BundleError, match="points outside the bundle"):
        verify(bundle)


def test_a_file_the_manifest_uses_must_be_hashed(bundle):
    edit(bundle, lambda m: m["sequence"].update(file="other.onnx"), keep_checksum=True)
    with pytest.raises(BundleError, match="sequence.file names 'other.onnx'"):
        verify(bundle)


def test_a_byte_flipped_file_and_a_foreign_manifest_are_refused(bundle):
    registered = bundle_sha256(bundle)
    (bundle / "sequence.onnx").write_bytes(b"grapH")
    with pytest.raises(BundleError, match="sequence.onnx does not match its sha256"):
        verify(bundle)
    (bundle / "sequence.onnx").write_bytes(b"graph")
    edit(bundle, lambda m: m.update(k=5), keep_checksum=True)  # self-consistent, but not the registered one
    verify(bundle)
    with pytest.raises(BundleError, match="not the one registered"):
        verify(bundle, registered)


def test_padding_and_titles():
    feeds = sequence_feeds([[4, 5, 6], [7]], 4, [[5], []])
    assert feeds["items"].tolist() == [[0, 4, 5, 6], [0, 0, 0, 7]]
    assert feeds["mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert feeds["exclude"].tolist() == [[5], [-1]]
    assert exclusion_matrix([[], []]).shape == (2, 1)
    assert np.array_equal(sequence_feeds([[1, 2, 3]], 2)["items"], [[2, 3]])
    assert title("Blue tent. Camping. Light and strong") == "Blue tent" and title(None) == ""
