"""Which CPU a benchmark ran on, and an AVX2 machine without VNNI emulated on an AVX-512 one.

``--cpu avx2`` (aggregation.py, kernels.py) re-runs the script with every library that picks
its kernels by instruction set held to AVX2:
- torch's own vectorised kernels: ``ATEN_CPU_CAPABILITY=avx2``;
- numpy's dispatched kernels (its sorts among them): ``NPY_DISABLE_CPU_FEATURES`` switches off
  the AVX-512 targets (X86_V4, AVX512_ICL, AVX512_SPR in numpy 2.4);
- numpy's and scipy's OpenBLAS: ``OPENBLAS_CORETYPE=Haswell`` (their AVX2 kernels);
- torch's MKL and oneDNN: ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``.
None of these decides ``torch._int_mm`` on the CPU: torch sends it to oneDNN only when
``at::cpu::is_avx512_vnni_supported()`` (cpuinfo, the hardware) and oneDNN is enabled, and
otherwise runs a plain triple loop (aten/src/ATen/native/LinearAlgebra.cpp, ``_int_mm_out_cpu``).
Capped at AVX2, oneDNN's int8 product stays faster than float32 here, so capping it is not
what a machine without VNNI does; the emulation switches oneDNN off in the process
(``torch.backends.mkldnn.enabled = False``), which takes torch down the same loop that machine
takes (100 x 65,536 int8 block, one thread: 0.41-0.66 s here, 0.65 s in issue 23's measurement;
``benchmarks/int8_gemm.py``).
What cannot be emulated: clock, cache sizes and the number of vector units. The float32
products still run on this machine's cores, so the int8 : float32 gap is wider here than there.
"""

from __future__ import annotations

import os
import sys

AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
MARK = "FL_DEFENSE_EMULATED_CPU"


def cpu_argument() -> str:
    """The script's ``--cpu`` value, read before its own parser runs (which is after the imports)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cpu", default="native")
    return pre.parse_known_args()[0].cpu


def emulate(cpu: str) -> None:
    """Make this process run as on ``cpu`` ("native": as it is; "avx2": AVX2 without VNNI).
    Environment variables are read when the libraries load, so the first call re-executes the
    script with them set (before torch or numpy is imported, it must be called first)."""
    if cpu == "native":
        return
    if cpu != "avx2":
        raise ValueError(f"--cpu must be 'native' or 'avx2', got {cpu!r}")
    if os.environ.get(MARK) != cpu:
        if "torch" in sys.modules or "numpy" in sys.modules:
            raise RuntimeError("emulate() must run before torch and numpy are imported")
        env = {**os.environ, **AVX2_ENV, MARK: cpu}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import torch

    torch.backends.mkldnn.enabled = False  # torch._int_mm as on a CPU without AVX-512 VNNI


def describe() -> str:
    """One line naming what decides kernel speed in this process, for every table's header."""
    import numpy as np
    import torch
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    from threadpoolctl import threadpool_info

    dispatch = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
    blas = sorted({f"{i['internal_api']} {i.get('architecture')}" for i in threadpool_info() if i["user_api"] == "blas"})
    int8 = ("oneDNN (AVX-512 VNNI)" if __cpu_features__.get("AVX512VNNI") and torch.backends.mkldnn.enabled
            else "plain loop (no VNNI, or oneDNN off)")
    emulated = os.environ.get(MARK)
    return (f"torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}; "
            f"numpy {np.__version__} dispatch {'+'.join(dispatch) or 'baseline only'}; BLAS {', '.join(blas)}; "
            f"torch._int_mm: {int8}" + (f"; emulated: {emulated} on an AVX-512 CPU" if emulated else ""))
