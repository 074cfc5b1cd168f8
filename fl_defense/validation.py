"""Checks every client result passes before any defense sees it.

Each check returns a reason (a short sentence) or None; a rejected result is logged and counted,
never allowed to crash the round.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from .updates import ParamLayout


def check_arrays(arrays: object, layout: ParamLayout, max_update_norm: float = 0.0,
                 global_arrays: list[np.ndarray] | None = None) -> str | None:
    if not isinstance(arrays, (list, tuple)):
        return f"parameters must be a list of arrays, got {type(arrays).__name__}"
    if len(arrays) != len(layout.shapes):
        return f"expected {len(layout.shapes)} arrays, got {len(arrays)}"
    for i, (a, shape, dtype) in enumerate(zip(arrays, layout.shapes, layout.dtypes)):
        if not isinstance(a, np.ndarray):
            return f"array {i} is a {type(a).__name__}, not an ndarray"
        if tuple(a.shape) != shape:
            return f"array {i} has shape {tuple(a.shape)}, expected {shape}"
        if np.dtype(dtype).kind != a.dtype.kind and not (np.dtype(dtype).kind in "iu" and a.dtype.kind in "iu"):
            return f"array {i} has dtype {a.dtype}, expected {dtype}"
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            return f"array {i} contains NaN or Inf"
    if max_update_norm > 0 and global_arrays is not None:
        sq = sum(float(np.sum((arrays[i].astype(np.float64) - global_arrays[i]) ** 2)) for i in layout.trainable_indices)
        if not sq ** 0.5 <= max_update_norm:
            return f"update norm {sq ** 0.5:.3g} exceeds the bound {max_update_norm:g}"
    return None


def check_num_examples(num_examples: object) -> str | None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, Integral):
        return f"num_examples must be an integer, got {type(num_examples).__name__}"
    if num_examples <= 0:
        return f"num_examples must be positive, got {num_examples}"
    return None
