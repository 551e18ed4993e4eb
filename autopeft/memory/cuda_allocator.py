"""Planning for a GPU: the bytes CUDA's caching allocator hands out for a step's allocations, and the
cuBLAS workspaces."""

from __future__ import annotations

import bisect
from typing import Any

import torch


class CachingAllocator:
    """The bytes PyTorch's CUDA caching allocator (default settings) reports as allocated, replayed from a
    sequence of allocations and frees: torch.cuda.max_memory_allocated counts whole blocks, and a block is
    often larger than its tensor. Requests are rounded up to 512 bytes; up to 1 MiB they come from 2 MiB
    segments, up to 10 MiB from 20 MiB segments, beyond in their own segment rounded up to 2 MiB; the
    smallest cached free block that fits is used, and split only if what remains is at least 512 bytes
    (small pool) or more than 1 MiB (large pool): otherwise the whole block is handed out. Freed blocks
    merge with free neighbours of their segment. (CUDACachingAllocator.cpp: round_size,
    get_allocation_size, get_free_block, should_split, free_block.)"""

    MIN_BLOCK, SMALL, SMALL_SEGMENT, LARGE_SEGMENT, MIN_LARGE_ALLOC, ROUND_LARGE = (
        512, 1 << 20, 2 << 20, 20 << 20, 10 << 20, 2 << 20)

    def __init__(self) -> None:
        self.free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> (size, seg, at)
        self.size: dict[tuple[int, int], int] = {}  # every block: (segment, offset) -> size
        self.ending: dict[tuple[int, int], int] = {}  # (segment, end) -> offset of the block ending there
        self.in_small_pool: list[bool] = []  # per segment
        self.is_free: set[tuple[int, int]] = set()
        self.allocated = 0

    def replay(self, events: list[tuple[int, bool, Any]]) -> tuple[int, int]:
        """(tick of the peak, peak allocated bytes) over (tick, allocated?, storage with .nbytes) events."""
        handles: dict[int, tuple[int, int]] = {}
        peak, peak_tick = 0, 0
        for tick, born, record in events:
            if born:
                handle = self.malloc(record.nbytes)
                if handle is not None:
                    handles[id(record)] = handle
                if self.allocated > peak:
                    peak, peak_tick = self.allocated, tick
            elif id(record) in handles:
                self.release(handles.pop(id(record)))
        return peak_tick, peak

    def malloc(self, nbytes: int) -> tuple[int, int] | None:
        if nbytes == 0:
            return None
        size = max(self.MIN_BLOCK, -(-nbytes // self.MIN_BLOCK) * self.MIN_BLOCK)
        small = size <= self.SMALL
        pool = self.free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index < len(pool):
            block, segment, offset = pool[index]
            self._take_free((segment, offset))
        else:
            segment, offset, block = len(self.in_small_pool), 0, self._segment_size(size, small)
            self.in_small_pool.append(small)
        remaining = block - size
        if remaining >= self.MIN_BLOCK if small else remaining > self.SMALL:
            self._place(segment, offset + size, remaining, free=True)
            block = size
        self._place(segment, offset, block, free=False)
        self.allocated += block
        return segment, offset

    def release(self, handle: tuple[int, int]) -> None:
        segment, offset = handle
        size = self.size.pop(handle)
        del self.ending[(segment, offset + size)]
        self.allocated -= size
        after = (segment, offset + size)
        if after in self.is_free:  # merge with the free block that follows
            size += self._take_free(after)
        before = self.ending.get((segment, offset))
        if before is not None and (segment, before) in self.is_free:  # and with the one before
            size += self._take_free((segment, before))
            offset = before
        self._place(segment, offset, size, free=True)

    def _segment_size(self, size: int, small: bool) -> int:
        if small:
            return self.SMALL_SEGMENT
        if size < self.MIN_LARGE_ALLOC:
            return self.LARGE_SEGMENT
        return -(-size // self.ROUND_LARGE) * self.ROUND_LARGE

    def _place(self, segment: int, offset: int, size: int, *, free: bool) -> None:
        self.size[(segment, offset)] = size
        self.ending[(segment, offset + size)] = offset
        if free:
            self.is_free.add((segment, offset))
            bisect.insort(self.free[self.in_small_pool[segment]], (size, segment, offset))

    def _take_free(self, key: tuple[int, int]) -> int:
        """Remove a free block (to hand it out, or to merge it into a neighbour); returns its size."""
        segment, offset = key
        size = self.size.pop(key)
        self.ending.pop((segment, offset + size), None)
        self.is_free.discard(key)
        pool = self.free[self.in_small_pool[segment]]
        pool.pop(bisect.bisect_left(pool, (size, segment, offset)))
        return size


def cuda_workspace_bytes(device: torch.device | None = None) -> int:
    """cuBLAS workspaces that torch allocates through the caching allocator: one per thread that runs
    matmuls (ours for forward, autograd's device thread for backward), of torch's default size: 32 MiB on
    Hopper and newer (compute capability >= 9), 8 MiB + 128 KiB before; CUBLAS_WORKSPACE_CONFIG overrides.
    A GPU of unknown kind (planning on a CPU machine) is taken to be Hopper-class."""
    import os
    import re

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    sizes = re.findall(r":([0-9]+):([0-9]+)", config)
    if sizes:
        per_thread = sum(int(size) * 1024 * int(count) for size, count in sizes)
    else:
        major = torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else 9
        per_thread = 4096 * 1024 * 8 if major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * per_thread
