"""`.npz` files with the same bytes for the same arrays.

`numpy.savez` and `scipy.sparse.save_npz` stamp each zip entry with the current time, so an
unchanged result gets a new hash every time it is written, and every stage downstream of it
(in the pipeline's keys and in DVC) looks stale. These write a fixed timestamp; `numpy.load` and
`scipy.sparse.load_npz` read them as usual.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
_PIECE = 1 << 26  # bytes handed to the zip stream at a time


def save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            with zf.open(info, "w", force_zip64=True) as f:
                _write_npy(f, np.asanyarray(array))


def _write_npy(f, array: np.ndarray) -> None:
    """`numpy.lib.format.write_array`'s bytes. A zip entry is not a real file, so numpy would
    copy a C-ordered array out in 16 MiB pieces; its own buffer goes out in place instead (a 5M x
    128 user table: 8.1 s -> 1.9 s)."""
    header = _header(array) if array.flags.c_contiguous and not array.dtype.hasobject else None
    if header is None:
        np.lib.format.write_array(f, array, allow_pickle=False)
        return
    f.write(header)
    data = np.asarray(array).reshape(-1).view(np.uint8)  # np.matrix stays 2-d under reshape
    for start in range(0, data.size, _PIECE):
        f.write(data[start:start + _PIECE])


def _header(array: np.ndarray) -> bytes | None:
    """The smallest header version 1.0 or 2.0 that holds `array`'s, as write_array picks it;
    None for one only version 3.0 holds (field names beyond latin-1)."""
    meta = np.lib.format.header_data_from_array_1_0(array)
    for write_header in (np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0):
        header = io.BytesIO()
        try:
            write_header(header, meta)
            return header.getvalue()
        except (ValueError, UnicodeEncodeError):
            continue
    return None


def load_mapped(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` written by `save`, memory-mapped read-only: nothing is read until
    a row is used (evaluation of a sample of 5M users touches 100k rows of each user table).
    A compressed entry (or one of format 3.0) is read whole, as `numpy.load` would. The file
    must not be rewritten while its arrays are in use (the pipeline's stages of one folder run
    one at a time)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, path.open("rb") as raw:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
                continue
            # The entry's bytes start after its local header (30 bytes, its name, its extra field).
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
            raw.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            version = np.lib.format.read_magic(raw)
            if version not in ((1, 0), (2, 0)):  # 3.0 (UTF-8 field names) has no public reader
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
                continue
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(raw)
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                                  order="F" if fortran else "C") if int(np.prod(shape)) else np.empty(shape, dtype)
    return out


def save_sparse(path: Path, matrix: sp.spmatrix) -> None:
    """A CSR/CSC matrix in `scipy.sparse.save_npz`'s layout."""
    matrix = matrix.tocsr()
    save(path, indices=matrix.indices, indptr=matrix.indptr, format=np.array(matrix.format.encode("ascii")),
         shape=np.array(matrix.shape), data=matrix.data)
