"""The round's input: one contiguous matrix of client updates and what goes with it.

A defense never sees Flower objects. The adapters flatten each client's trainable arrays once
per round into one row of an ``n x d`` float32 matrix (on the configured device), subtract the
global vector, and hand the matrix over together with sample counts, client ids, optional
per-client Fisher diagonals and the layer boundaries (AmGrad and other layer-wise rules need them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class ParamLayout:
    """Shapes and dtypes of a model's arrays, and which of them are trainable.

    Defenses operate on the trainable arrays only; buffers (BatchNorm running statistics, counters)
    are averaged plainly by the adapter.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    trainable: tuple[bool, ...]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], trainable: list[bool] | None = None) -> "ParamLayout":
        if trainable is None:
            trainable = [np.issubdtype(a.dtype, np.floating) for a in arrays]
        if len(trainable) != len(arrays):
            raise ValueError(f"trainable mask has {len(trainable)} entries for {len(arrays)} arrays")
        return cls(
            shapes=tuple(tuple(int(s) for s in a.shape) for a in arrays),
            dtypes=tuple(str(a.dtype) for a in arrays),
            trainable=tuple(bool(t) for t in trainable),
        )

    @cached_property
    def trainable_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.trainable) if t]

    @cached_property
    def buffer_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.trainable) if not t]

    @cached_property
    def layer_slices(self) -> list[slice]:
        """Slices of the flat trainable vector, one per trainable array (a 'layer')."""
        slices, start = [], 0
        for i in self.trainable_indices:
            size = int(np.prod(self.shapes[i], dtype=np.int64))
            slices.append(slice(start, start + size))
            start += size
        return slices

    @cached_property
    def layer_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each trainable array, in the order of ``layer_slices``."""
        return [self.shapes[i] for i in self.trainable_indices]

    @cached_property
    def dtype(self) -> torch.dtype:
        """The updates matrix's dtype: float64 when a trainable array is float64 (so a float64
        model is aggregated in float64, as Flower does), else float32 (float16 models too)."""
        wide = any(np.dtype(self.dtypes[i]) == np.float64 for i in self.trainable_indices)
        return torch.float64 if wide else torch.float32

    @cached_property
    def dim(self) -> int:
        return sum(int(np.prod(self.shapes[i], dtype=np.int64)) for i in self.trainable_indices)

    def flatten_into(self, arrays: list[np.ndarray], out: torch.Tensor, minus: torch.Tensor | None = None) -> None:
        """Write the trainable arrays, flattened, into the 1-d tensor ``out`` (no extra copy); with
        ``minus``, write ``arrays - minus`` in the same pass."""
        for i, sl in zip(self.trainable_indices, self.layer_slices):
            src = torch.from_numpy(np.ascontiguousarray(arrays[i], dtype=_NP[self.dtype])).reshape(-1)
            if minus is None:
                out[sl].copy_(src)
            else:
                torch.sub(src.to(out.device, non_blocking=True), minus[sl], out=out[sl])

    def flatten(self, arrays: list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
        out = torch.empty(self.dim, dtype=self.dtype, device=device)
        self.flatten_into(arrays, out)
        return out

    def unflatten(self, vector: torch.Tensor, buffers: list[np.ndarray]) -> list[np.ndarray]:
        """Rebuild the full array list from a trainable vector and the buffer arrays (in order)."""
        flat = vector.detach().to("cpu", self.dtype).numpy()
        out: list[np.ndarray] = []
        buf = iter(buffers)
        slices = iter(self.layer_slices)
        for shape, dtype, is_trainable in zip(self.shapes, self.dtypes, self.trainable):
            if is_trainable:
                out.append(flat[next(slices)].reshape(shape).astype(dtype, copy=True))
            else:
                out.append(np.asarray(next(buf)).astype(dtype, copy=False).reshape(shape))
        return out


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def reuse_rows(buf: torch.Tensor | None, n: int, d: int, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """A buffer of at least n rows of d values, reused across rounds: ``buf`` itself when it is
    wide, tall enough and of the dtype and device, else a new n x d tensor (``buf`` released
    first when the caller holds no other reference). Callers take its first n rows."""
    if buf is not None and buf.shape[1] == d and buf.shape[0] >= n and buf.dtype == dtype \
            and buf.device == torch.device(device):
        return buf
    del buf
    return torch.empty((n, d), dtype=dtype, device=device)


@dataclass
class RoundUpdates:
    """The validated client updates of one round.

    ``updates[k]`` is client k's trainable parameters minus the global ones (delta_k in the papers);
    ``fisher[k]``, when present, is the diagonal Fisher information the client reported.
    ``layer_shapes``, when known, is each trainable array's shape (``layer_slices`` are their flat
    extents): FreqFed's 2-D DCT of a layer needs it.

    Both matrices are the round's workspace, refilled in place next round (``DefendedAggregation``
    keeps them allocated): a defense may overwrite them during its round but must copy whatever
    it keeps across rounds (FoolsGold copies its histories). Elementwise work over them goes
    block by block (``defenses.aggregators.column_blocks``) so no second n x d matrix is made.
    """

    updates: torch.Tensor
    num_examples: torch.Tensor
    client_ids: list[str]
    layer_slices: list[slice]
    fisher: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    layer_shapes: list[tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.updates.ndim != 2:
            raise ValueError("updates must be an n x d matrix")
        n = self.updates.shape[0]
        if self.num_examples.shape != (n,) or len(self.client_ids) != n:
            raise ValueError("num_examples and client_ids must have one entry per update row")
        if self.fisher is not None and self.fisher.shape != self.updates.shape:
            raise ValueError("fisher must have the shape of the updates matrix")
        if self.layer_shapes is not None and (
                len(self.layer_shapes) != len(self.layer_slices)
                or any(int(np.prod(s, dtype=np.int64)) != sl.stop - sl.start
                       for s, sl in zip(self.layer_shapes, self.layer_slices))):
            raise ValueError("layer_shapes must give one shape per layer slice, of the slice's size")

    @property
    def n(self) -> int:
        return int(self.updates.shape[0])

    @property
    def d(self) -> int:
        return int(self.updates.shape[1])

    @property
    def device(self) -> torch.device:
        return self.updates.device

    @property
    def sample_weights(self) -> torch.Tensor:
        """n_k / sum n_k, the FedAvg weights."""
        w = self.num_examples.to(self.updates.device, self.updates.dtype)
        return w / w.sum()
