"""How many tokens per sequence to speculate at batch size B (SSSD, docs/references.md §4).

A forward over N tokens reads each weight once (`bytes` per weight) and does 2 FLOPs per weight and
token. It costs about as much as a forward over one token while it is memory-bound, i.e. while
2 N / bytes < F / BW (F: matmul FLOP/s, BW: memory bandwidth in bytes/s). The knee, in tokens, is

    I_knee = (F / BW) x bytes / 2        (bfloat16: I_knee = F / BW, SSSD's figure: ~206 on an H200)

A batch of B sequences that each add k drafted tokens to their one token puts about B (1 + k) tokens
through the target, so SSSD speculates k = I_knee / B per sequence: many at batch 1, few at large
batch. The rule here: k = 0 (plain batched decoding) when I_knee < B, since a forward is then
compute-bound already and a drafted token costs as much as a decoded one; otherwise
k = clamp(round(I_knee / B), 1, k_max).

`measure_i_knee` times a matmul and a copy on the device (~0.2 s) and is memoised per (device, dtype)
for the process: the figure belongs to the hardware, not to a decoder.
"""

from __future__ import annotations

import functools
import time

import torch

from sprinter.errors import SprinterError

K_MAX = 8  # longest chain the rule proposes (n-gram chains rarely stay right longer)


def speculation_length(i_knee: float, batch_size: int, k_max: int = K_MAX) -> int:
    """Tokens to draft per sequence at this batch size: 0 when I_knee < B, else clamp(round(I_knee / B), 1, k_max)."""
    if not (isinstance(i_knee, (int, float)) and i_knee > 0):
        raise SprinterError(f"i_knee: got {i_knee!r}; expected a number > 0 (tokens per forward at the roofline knee)")
    if i_knee < batch_size:
        return 0
    return min(k_max, max(1, round(i_knee / batch_size)))


def knee(flops_per_second: float, bytes_per_second: float, bytes_per_weight: int) -> float:
    """I_knee in tokens per forward from the two rates (see the module docstring)."""
    return flops_per_second / bytes_per_second * bytes_per_weight / 2


@functools.lru_cache(maxsize=None)
def measure_i_knee(device: torch.device, dtype: torch.dtype) -> float:
    """I_knee of this device for weights of this dtype: the best of a few timed square matmuls over the best
    of a few timed copies of a buffer larger than the CPU caches."""
    cuda = device.type == "cuda"
    n = 4096 if cuda else 512  # a matmul big enough to run at full rate, small enough to time in ms
    elements = (256 if cuda else 32) * 2**20 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(0)  # its own generator: the caller's global RNG is untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    src = torch.empty(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)

    def best_seconds(work, repeats: int) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            work()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    flops = 2 * n**3 / best_seconds(lambda: a @ a, 5)
    bandwidth = 2 * src.numel() * src.element_size() / best_seconds(lambda: dst.copy_(src), 5)  # read + write
    return knee(flops, bandwidth, src.element_size())


__all__ = ["K_MAX", "knee", "measure_i_knee", "speculation_length"]
