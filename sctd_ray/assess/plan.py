"""Shard planning: teachers split among workers, balanced by estimated cost (ARCHITECTURE:
data flow of a scan). Longest-processing-time-first greedy: within 4/3 of the optimum."""

from __future__ import annotations

import heapq

# Rough constants for this estimate only: relative costs decide the plan, not absolute seconds.
FLOP_PER_PARAM_PIXEL = 2.0 / 1024.0   # forward FLOPs ~ 2 x params x (H*W / 32^2) for small convnets
DEVICE_FLOPS = 2e10                  # per second, a CPU slot; a GPU only scales every cost alike
BYTES_PER_SECOND = 1e8               # store download rate
PER_TEACHER_SECONDS = 0.05           # building the model, writing results


def estimate_seconds(params: int, input_size, nbytes: int, samples: int) -> float:
    """Estimated cost of scoring one teacher on ``samples`` target images."""
    h, w = (int(input_size[-2]), int(input_size[-1])) if input_size is not None else (32, 32)
    flops = FLOP_PER_PARAM_PIXEL * float(params or 0) * h * w * samples
    return flops / DEVICE_FLOPS + float(nbytes or 0) / BYTES_PER_SECOND + PER_TEACHER_SECONDS


def plan_shards(costs: dict[str, float], n: int) -> list[list[str]]:
    """Split teacher ids into ``n`` shards of near-equal total cost; each shard is ordered
    most expensive first (so the small ones fill the tail)."""
    n = max(1, min(n, len(costs))) if costs else max(1, n)
    heap = [(0.0, i) for i in range(n)]
    shards: list[list[str]] = [[] for _ in range(n)]
    for tid in sorted(costs, key=lambda t: (-costs[t], t)):
        load, i = heapq.heappop(heap)
        shards[i].append(tid)
        heapq.heappush(heap, (load + costs[tid], i))
    return shards
