"""`.npz` files with the same bytes for the same arrays.

`numpy.savez` and `scipy.sparse.save_npz` stamp each zip entry with the current time, so an
unchanged result gets a new hash every time it is written, and every stage downstream of it
(in the pipeline's keys and in DVC) looks stale. These write a fixed timestamp; `numpy.load` and
`scipy.sparse.load_npz` read them as usual.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def save_sparse(path: Path, matrix: sp.spmatrix) -> None:
    """A CSR/CSC matrix in `scipy.sparse.save_npz`'s layout."""
    matrix = matrix.tocsr()
    save(path, indices=matrix.indices, indptr=matrix.indptr, format=np.array(matrix.format.encode("ascii")),
         shape=np.array(matrix.shape), data=matrix.data)
