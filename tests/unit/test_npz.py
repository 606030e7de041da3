""".npz files: numpy's bytes for each entry, the same file for the same arrays, readable both ways."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from components import npz


def test_entries_are_numpys_bytes_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "table": rng.standard_normal((70_000, 33), dtype=np.float32),  # several pieces of the fast path
        "ids": np.arange(10),
        "empty": np.zeros((0, 5), np.float32),
        "format": np.array(b"csr"),
        "fortran": np.asfortranarray(rng.standard_normal((30, 4))),
        "strided": np.arange(20)[::2],
        "flags": rng.random(1001) > 0.5,
        "text": np.array(["ab", "c"]),
        "deep": np.zeros((1,) * 40),  # a header too long for format version 1.0
    }
    old_piece, npz._PIECE = npz._PIECE, 4096  # so the small table also goes out in pieces
    try:
        npz.save(tmp_path / "a.npz", **arrays)
    finally:
        npz._PIECE = old_piece
    npz.save(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        for name, array in arrays.items():
            expected = io.BytesIO()
            np.lib.format.write_array(expected, array, allow_pickle=False)
            assert zf.read(f"{name}.npy") == expected.getvalue(), name
    loaded, mapped = np.load(tmp_path / "a.npz"), npz.load_mapped(tmp_path / "a.npz")
    for name, array in arrays.items():
        assert np.array_equal(loaded[name], array) and np.array_equal(mapped[name], array), name
