"""Process-wide numerics set-up: make the first vector-math call single-threaded.

On CPU, torch computes ``sqrt``, ``exp``, ``log``, ``sin``, ``cos``, ``tanh``, ``erf`` and a few
more on float tensors with MKL's vector math library (VML), splitting tensors of more than 2048
elements over its threads. VML picks each kernel from a table indexed by CPU type and accuracy
mode (high accuracy, low accuracy, "enhanced performance"). The CPU type is detected lazily, on
the first VML call of the process, into a static variable that briefly holds MKL's *raw* CPU id
before the table's id replaces it. A thread whose first VML call reads it in that moment takes
the raw id; where raw and table ids differ (recent Intel CPUs; on AMD CPUs both are 0) the raw id
lands in the enhanced-performance row, and that thread's share of that one call comes from a
low-accuracy AVX2 kernel: float32 ``sqrt`` off by up to ~2.4e-4 relative (thousands of ulp)
although high accuracy was asked for. Later calls use the settled id, so only the first parallel
VML call of a process can be wrong, only with 2 or more threads, and only in some processes
(about one in six was seen; predictions then differed by up to 0.026 eV and 0.16 eV/A).

:func:`initialise_vector_math` makes one small (single-threaded) call of each such function so
that detection finishes before any parallel region. In torch's statically linked MKL all VML
functions share the one detected CPU type, so the first call suffices; the others cover MKL
builds that dispatch each function separately. Every model calls it when it is built
(:class:`~catforge.models.forces.ForceModel`), before it can run; code that runs these functions
on large tensors without a model calls it first.
Upstream: pytorch/pytorch#188792 (oneMKL 2024.2; reported fixed in oneMKL 2025.0).
"""

from __future__ import annotations

import torch

# The float unary ops torch computes with MKL VML (aten/src/ATen/cpu/vml.h).
_VML_FUNCTIONS = (
    torch.sqrt,
    torch.exp,
    torch.log,
    torch.log2,
    torch.log10,
    torch.sin,
    torch.cos,
    torch.tan,
    torch.tanh,
    torch.asin,
    torch.acos,
    torch.atan,
    torch.erf,
    torch.erfc,
    torch.erfinv,
    torch.trunc,
)


_initialised = False


def initialise_vector_math() -> None:
    """Finish MKL VML's lazy dispatch on this thread (about 2 ms, once per process).

    One element per call runs without a parallel region.
    """
    global _initialised
    if _initialised:
        return
    _initialised = True
    for dtype in (torch.float32, torch.float64):
        value = torch.full((1,), 0.5, dtype=dtype)
        for function in _VML_FUNCTIONS:
            function(value)
