"""Paged KV cache bookkeeping: a pool of fixed-size blocks handed out to requests (no tensors here)."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Invariant: every block is either in the free list or allocated, never both; each is freed exactly once."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)  # 1 while a block is handed out

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._allocated[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._allocated[b]:
                raise RuntimeError(f"KV block {b} freed twice")
            self._allocated[b] = 0
        self._free.extend(blocks)
