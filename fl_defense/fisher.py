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


def payload_length(payload: bytes) -> int:
    """The number of entries a payload's header declares (decode_fisher still checks it all)."""
    if len(payload) < _HEADER.size:
        raise FisherDecodeError("Fisher payload shorter than its header")
    return _HEADER.unpack_from(payload)[2]


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


FISHER_METHODS = ("auto", "layers", "vmap")


def empirical_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    max_samples: int | None = 512,
    method: str = "auto",
) -> np.ndarray:
    """Diagonal empirical Fisher over the trainable parameters, flattened in parameter order.

    Per-sample squared gradients of -log p(y_i | x_i) are averaged. Two ways to the same numbers:

    - ``"layers"``: one batched forward and backward pass, and per layer the sum over samples of
      the squared per-sample gradient from the layer's inputs a_i and output gradients g_i. For a
      linear layer the per-sample gradient is g_i a_i^T, so the sum of its squares is
      (g^2)^T (a^2), one product; a convolution's per-sample gradient is formed from its unfolded
      inputs (it shares weights over positions) and squared. Needs every trainable parameter in a
      plain ``Linear`` (inputs of one row per sample) or ``Conv2d`` (zero padding, one group),
      each layer with its own parameters and run once per forward pass; checked on every batch.
    - ``"vmap"``: per-sample gradients of the whole model from ``torch.func`` (vmap over grad),
      for any model.

    Both give the same numbers up to float rounding where ``"layers"`` applies (tested against the
    one-sample-at-a-time definition); ``"auto"`` takes ``"layers"`` there, else ``"vmap"``.
    """
    if method not in FISHER_METHODS:
        raise ValueError(f"method must be one of {FISHER_METHODS}, got {method!r}")
    model.eval()
    if max_samples is not None and len(inputs) > max_samples:
        inputs, labels = inputs[:max_samples], labels[:max_samples]
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    total = None
    if method in ("auto", "layers"):
        total = _layerwise_squared_gradients(model, params, inputs, labels, batch_size)
        if total is None and method == "layers":
            raise ValueError("the layer-wise Fisher does not cover this model (see _layerwise_squared_gradients: "
                             "parameters outside plain Linear/Conv2d layers, shared or reused layers, in-place "
                             "changes, samples folded into the batch); use method='vmap'")
    if total is None:
        total = _vmap_squared_gradients(model, params, inputs, labels, batch_size)
    n = max(1, len(inputs))
    return torch.cat([(total[k] / n).reshape(-1) for k in params]).cpu().numpy().astype(np.float32)


def _vmap_squared_gradients(model, params, inputs, labels, batch_size) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    detached = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def nll(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0), randomness="different")
    total = {k: torch.zeros_like(v) for k, v in detached.items()}
    for start in range(0, len(inputs), batch_size):
        grads = per_sample(detached, inputs[start : start + batch_size], labels[start : start + batch_size])
        for k, g in grads.items():
            total[k] += (g**2).sum(dim=0)
    return total


def _layer_supported(module: torch.nn.Module) -> bool:
    """Exactly a ``Linear`` or ``Conv2d`` (zero padding given as numbers, one group) whose own
    parameters are its ``weight`` and ``bias`` (not subclasses, not reparametrised weights)."""
    if {name for name, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}:
        return False
    if type(module) is torch.nn.Linear:
        return True
    if type(module) is torch.nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def _layerwise_squared_gradients(model, params, inputs, labels, batch_size) -> dict[str, torch.Tensor] | None:
    """Sum over samples of squared per-sample gradients, layer by layer (``empirical_fisher``'s
    ``"layers"``); None when the model is outside what this covers: a trainable parameter outside
    a supported layer, a parameter shared by two layers, a layer run twice or not at all in a
    forward pass, a layer input or output changed in place after the layer ran, or a layer whose
    inputs do not have one row per sample (samples folded into the batch axis)."""
    names = {id(p): k for k, p in params.items()}
    layers = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _layer_supported(module):
            return None
        layers.append(module)
    owned = [id(p) for m in layers for p in m.parameters(recurse=False) if p.requires_grad]
    if len(owned) != len(set(owned)) or set(owned) != set(names):
        return None
    seen: dict[torch.nn.Module, list] = {}

    def keep(module, args, out):
        seen.setdefault(module, []).append((args[0], args[0]._version, out, out._version))

    def covered(m, v, batch) -> bool:
        if len(v) != 1:
            return False
        a, a_version, out, out_version = v[0]
        if a._version != a_version or out._version != out_version or a.shape[0] != batch:
            return False
        return a.ndim == 2 if isinstance(m, torch.nn.Linear) else True

    total = {k: torch.zeros_like(v, memory_format=torch.contiguous_format).detach() for k, v in params.items()}
    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        for start in range(0, len(inputs), batch_size):
            seen.clear()
            x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")  # d loss / d out_i = g_i
            if len(seen) != len(layers) or not all(covered(m, v, len(x)) for m, v in seen.items()):
                return None
            outs = [seen[m][0][2] for m in layers]
            # an output that does not reach the loss has zero per-sample gradients: nothing to add
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
            for m, g in zip(layers, grads):
                if g is None:
                    continue
                a = seen[m][0][0].detach()
                w, b = m.weight, m.bias
                if isinstance(m, torch.nn.Linear):
                    if w.requires_grad:
                        total[names[id(w)]] += (g * g).T @ (a * a)
                    if b is not None and b.requires_grad:
                        total[names[id(b)]] += (g * g).sum(dim=0)
                    continue
                g = g.reshape(g.shape[0], g.shape[1], -1)  # N x out x positions
                if w.requires_grad:
                    cols = torch.nn.functional.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                                                      stride=m.stride)  # N x (C k k) x positions
                    per_sample = torch.bmm(g, cols.transpose(1, 2))  # N x out x (C k k)
                    total[names[id(w)]] += (per_sample * per_sample).sum(dim=0).reshape(w.shape)
                if b is not None and b.requires_grad:
                    gb = g.sum(dim=2)
                    total[names[id(b)]] += (gb * gb).sum(dim=0)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return total


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
