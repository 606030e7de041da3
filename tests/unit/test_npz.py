""".npz files: numpy's bytes for each entry, the same file for the same arrays, readable both ways."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from components import npz


@pytest.mark.filterwarnings("ignore:Stored array in format")  # numpy's own note on headers past version 1.0
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
        "deep": np.zeros((1,) * 40),
        "accented": np.zeros(2, [("\u00e9\u20ac", np.int32)]),  # a name only version 3.0 holds
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
        assert [zf.read(f"{n}.npy")[6] for n in ("table", "accented")] == [1, 3]  # header versions
    loaded, mapped = np.load(tmp_path / "a.npz"), npz.load_mapped(tmp_path / "a.npz")
    for name, array in arrays.items():
        for back in (loaded[name], mapped[name]):
            assert back.dtype == array.dtype and back.shape == array.shape, name
            assert np.ascontiguousarray(back).tobytes() == np.ascontiguousarray(array).tobytes(), name
    # A header too long for version 1.0 (numpy.load refuses to read it back unless trusted).
    wide = np.zeros(2, [(f"field{i}", np.int8) for i in range(5000)])
    npz.save(tmp_path / "wide.npz", wide=wide)
    expected = io.BytesIO()
    np.lib.format.write_array(expected, wide, allow_pickle=False)
    with zipfile.ZipFile(tmp_path / "wide.npz") as zf:
        assert zf.read("wide.npy") == expected.getvalue() and expected.getvalue()[6] == 2
