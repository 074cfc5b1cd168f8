"""Diagonal empirical Fisher information and its wire encoding.

Clients compute F_ii = E[(d log p(y|x) / d w_i)^2] over their local data with the trained local
model (per-sample gradients of the log-likelihood of the true label, squared and averaged). On the
wire it travels as bytes with a 16-byte header (magic, dtype code, length) that the server checks
before trusting a single value.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

MAGIC = b"FIS1"
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES = {v: k for k, v in _DTYPES.items()}
_HEADER = struct.Struct("<4sIQ")  # magic, dtype code, number of entries


class FisherDecodeError(ValueError):
    """A Fisher payload that cannot be trusted; the message says why."""


def encode_fisher(fisher: np.ndarray, half: bool = False) -> bytes:
    dtype = _DTYPES[2] if half else _DTYPES[1]
    arr = np.ascontiguousarray(np.asarray(fisher).reshape(-1), dtype=dtype)
    return _HEADER.pack(MAGIC, _CODES[dtype], arr.size) + arr.tobytes()


def decode_fisher(payload: object, expected_len: int) -> np.ndarray:
    """Decode and check a Fisher payload; raise FisherDecodeError with the reason otherwise.

    ``payload`` is the bytes of the legacy API (fit metrics) or the array the Message API carries
    in its own ArrayRecord; both get the same checks.
    """
    if payload is None:
        raise FisherDecodeError("Fisher information is missing (the defense needs it)")
    if isinstance(payload, np.ndarray):
        return _check_values(payload, expected_len)
    if not isinstance(payload, (bytes, bytearray)):
        raise FisherDecodeError(f"Fisher payload must be bytes, got {type(payload).__name__}")
    if len(payload) < _HEADER.size:
        raise FisherDecodeError("Fisher payload shorter than its header")
    magic, code, length = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise FisherDecodeError("Fisher payload has a bad magic number")
    if code not in _DTYPES:
        raise FisherDecodeError(f"Fisher payload has unknown dtype code {code}")
    dtype = _DTYPES[code]
    if length != expected_len:
        raise FisherDecodeError(f"Fisher has {length} entries, the model has {expected_len} trainable parameters")
    if len(payload) - _HEADER.size != length * dtype.itemsize:
        raise FisherDecodeError("Fisher payload length does not match its header")
    return _check_values(np.frombuffer(payload, dtype=dtype, offset=_HEADER.size), expected_len)


def _check_values(fisher: np.ndarray, expected_len: int) -> np.ndarray:
    if fisher.dtype.kind != "f":
        raise FisherDecodeError(f"Fisher must be floating point, got {fisher.dtype}")
    if fisher.size != expected_len:
        raise FisherDecodeError(f"Fisher has {fisher.size} entries, the model has {expected_len} trainable parameters")
    fisher = fisher.reshape(-1).astype(np.float32, copy=False)
    # two SIMD reductions instead of boolean temporaries: NaN makes the minimum NaN, +-Inf shows
    # in the extremes
    lo, hi = (fisher.min(), fisher.max()) if fisher.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise FisherDecodeError("Fisher contains NaN or Inf")
    if lo < 0:
        raise FisherDecodeError("Fisher contains negative entries")
    return fisher


def empirical_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    max_samples: int | None = 512,
) -> np.ndarray:
    """Diagonal empirical Fisher over the trainable parameters, flattened in parameter order.

    Per-sample squared gradients of -log p(y_i | x_i) are averaged; per-sample gradients come from
    ``torch.func`` (vmap over grad), so a batch costs one vectorised backward pass.
    """
    from torch.func import functional_call, grad, vmap

    model.eval()
    if max_samples is not None and len(inputs) > max_samples:
        inputs, labels = inputs[:max_samples], labels[:max_samples]
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def nll(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0), randomness="different")
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, len(inputs), batch_size):
        grads = per_sample(params, inputs[start : start + batch_size], labels[start : start + batch_size])
        for k, g in grads.items():
            total[k] += (g**2).sum(dim=0)
    n = max(1, len(inputs))
    return torch.cat([(total[k] / n).reshape(-1) for k in params]).cpu().numpy().astype(np.float32)


class ValidationFisher:
    """The diagonal Fisher of a model on a fixed (server-held) dataset, as a function of the
    trainable-parameter vector: what SDFC compares client-reported Fisher against.

    The vector is cloned before it is loaded, so computing a Fisher never aliases the caller's
    tensor (``vector_to_parameters`` alone would make the model's parameters views of it).
    """

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 max_samples: int | None = 512) -> None:
        if len(labels) == 0:
            raise ValueError("the validation set is empty (raise server-fraction)")
        self.model = model
        self.images, self.labels = images, labels
        self.max_samples = max_samples

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vector.detach().to("cpu", torch.float32).clone(), params)
        return torch.from_numpy(empirical_fisher(self.model, self.images, self.labels, max_samples=self.max_samples))
