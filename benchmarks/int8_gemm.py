"""torch's int8 GEMM against the float32 products of the same -1/0/1 values, one thread.

    python benchmarks/int8_gemm.py                              # this CPU
    python benchmarks/int8_gemm.py --cpu avx2                   # as on AVX2 without VNNI (cpu.py)
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/int8_gemm.py      # oneDNN capped, oneDNN still on

The check behind the AVX2 emulation (docs/results/aggregation.md): a 100 x 65,536 int8 block of
ternary signs, ``torch._int_mm(t, t.T)`` against ``f @ f.T`` in torch (MKL) and numpy (OpenBLAS's
symmetric product), best of five calls after one.
"""

from __future__ import annotations

from cpu import cpu_argument, describe, emulate  # benchmarks/cpu.py

emulate(cpu_argument())

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from timing import best  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", choices=["native", "avx2"], default="native")
    parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    t = np.random.default_rng(0).integers(-1, 2, size=(100, 65_536)).astype(np.int8)
    tt, f = torch.from_numpy(t), t.astype(np.float32)
    ft = torch.from_numpy(f)
    print(f"CPU: {describe()}")
    print("| product, 100 x 65,536, one thread | seconds |\n|---|---|")
    print(f"| torch._int_mm (int8) | {best(lambda: torch._int_mm(tt, tt.T), 5):.4f} |")
    print(f"| torch float32 f @ f.T | {best(lambda: ft @ ft.T, 5):.4f} |")
    print(f"| numpy float32 f @ f.T (symmetric) | {best(lambda: f @ f.T, 5):.4f} |")


if __name__ == "__main__":
    main()
