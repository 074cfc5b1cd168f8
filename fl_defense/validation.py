"""Checks every client result passes before any defense sees it.

Each check returns a reason (a short sentence) or None (``update_norm`` returns the update's norm
beside it); a rejected result is logged and counted, never allowed to crash the round.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch

from .updates import ParamLayout


def check_arrays(arrays: object, layout: ParamLayout) -> str | None:
    """Structure (count, shapes, dtypes) of a client's arrays, and the values of its buffers.

    The trainable arrays' values are checked on the flattened update instead (``update_norm``),
    in the same pass that builds the updates matrix, while the row is still in cache."""
    if not isinstance(arrays, (list, tuple)):
        return f"parameters must be a list of arrays, got {type(arrays).__name__}"
    if len(arrays) != len(layout.shapes):
        return f"expected {len(layout.shapes)} arrays, got {len(arrays)}"
    for i, (a, shape, dtype, trainable) in enumerate(zip(arrays, layout.shapes, layout.dtypes, layout.trainable)):
        if not isinstance(a, np.ndarray):
            return f"array {i} is a {type(a).__name__}, not an ndarray"
        if tuple(a.shape) != shape:
            return f"array {i} has shape {tuple(a.shape)}, expected {shape}"
        if np.dtype(dtype).kind != a.dtype.kind and not (np.dtype(dtype).kind in "iu" and a.dtype.kind in "iu"):
            return f"array {i} has dtype {a.dtype}, expected {dtype}"
        if not trainable and a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            return f"array {i} contains NaN or Inf"
    return None


def check_update(row: torch.Tensor, arrays: list[np.ndarray], layout: ParamLayout,
                 max_update_norm: float = 0.0) -> str | None:
    """The reason to reject one flattened update delta_k = w_k - w, or None (``update_norm``)."""
    return update_norm(row, arrays, layout, max_update_norm)[1]


def update_norm(row: torch.Tensor, arrays: list[np.ndarray], layout: ParamLayout,
                max_update_norm: float = 0.0) -> tuple[float | None, str | None]:
    """(||delta_k||_2, None) for an acceptable flattened update delta_k = w_k - w (float32, as the
    defenses see it), or (None, the reason to reject it).

    One dot product decides the common case: ||delta||^2 is finite exactly when every entry is
    finite and the norm does not overflow float32 (the Gram-based defenses would get inf or NaN
    distances from such a row). The same product is the norm the round's record keeps, so the
    record costs no further pass. Only a rejected row is looked at again, to name the array."""
    r = row.detach()
    if r.device.type == "cpu":
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the answer, not an error
            sq = float(np.dot(r.numpy(), r.numpy()))  # numpy's dot: 2x torch's here
    else:
        sq = float(torch.dot(r, r))
    if math.isfinite(sq):
        norm = math.sqrt(sq)
        if max_update_norm > 0 and not norm <= max_update_norm:
            return None, f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
        return norm, None
    for i, sl in zip(layout.trainable_indices, layout.layer_slices):
        if not np.all(np.isfinite(arrays[i])):
            return None, f"array {i} contains NaN or Inf"
        if not bool(torch.isfinite(row[sl]).all()):
            return None, f"array {i} minus the global model is not finite in float32 (overflow)"
    return None, f"update norm overflows float32 (||delta||^2 > {np.finfo(np.float32).max:.3g})"


def check_num_examples(num_examples: object) -> str | None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, Integral):
        return f"num_examples must be an integer, got {type(num_examples).__name__}"
    if num_examples <= 0:
        return f"num_examples must be positive, got {num_examples}"
    return None
