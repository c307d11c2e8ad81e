"""How fast a decision *could* be on this machine: FLOPs counted, and the CPU's own matrix-product rate.

A speed target is only worth chasing if the hardware allows it. :func:`count_flops` counts the
floating-point operations of a call with ``torch.utils.flop_counter`` (matrix products, including
the fused CPU attention kernel, whose formula torch does not register: :func:`_cpu_flash_flop`);
:func:`gemm_rate` times a matrix product of a given shape with the threads the benchmark uses, and
:func:`read_rate` how fast those threads read memory. Decoding does two kinds of work one after the
other: products with the weights (compute-bound at a batch of tokens) and attention over the KV cache
(a read of the whole cache per new token: memory-bound). So the *floor* of a call is
``FLOPs / matmul rate + KV bytes read / read rate``: its time if both ran at the machine's own rates
and nothing else (Python, sampling, the weights' reads) cost anything. ``bench/decode.py`` prints it
next to each measured figure, so a target below the floor is seen to be out of reach on this hardware
rather than missed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_aten = torch.ops.aten


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _cpu_flash_flop(query, key, value, *args, **kwargs) -> int:
    """``Q K^T`` and ``P V``: 2 x 2 B H Q L D (the CPU kernel has no formula in torch's table)."""
    b, h, q, d = query.shape
    return 4 * b * h * q * key.shape[-2] * d


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (matrix products and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: str) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously; a CPU op is done when it returns)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(m: int, k: int, n: int, seconds: float = 0.5, device: str = "cpu") -> float:
    """FLOP/s of an ``(m, k) @ (k, n)`` float32 product on ``device`` (best of repeated runs)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    torch.mm(a, b, out=out)  # warm-up
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * m * k * n / best


def read_rate(megabytes: int = 256, seconds: float = 0.5, device: str = "cpu") -> float:
    """Bytes/s at which torch reads a float32 tensor far larger than the caches on ``device``."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    x.sum()  # warm-up (first touch)
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best
