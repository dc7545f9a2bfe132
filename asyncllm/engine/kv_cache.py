"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts, and the prefix cache.

A block is in exactly one of three states:
  free       — in the free list, ref 0, not cached;
  in use     — ref > 0 (held by that many requests), maybe also cached;
  evictable  — ref 0 and cached: its K/V stay valid for future prefix hits until the pool needs the block.
`num_free_blocks` counts free + evictable: both can be handed out.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from asyncllm.engine.radix_cache import RadixCache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self.cache = RadixCache(block_size) if enable_prefix_caching else None
        self._num_evictable = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self._num_evictable

    @property
    def num_cached_blocks(self) -> int:
        return self.cache.num_blocks if self.cache is not None else 0

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks, {self.num_free_blocks} free")
        if num_blocks > len(self._free):
            assert self.cache is not None
            evicted = self.cache.evict(num_blocks - len(self._free), lambda b: self._ref[b] == 0)
            self._num_evictable -= len(evicted)
            self._free.extend(evicted)
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self.cache is not None and b in self.cache:
                    self._num_evictable += 1
                else:
                    self._free.append(b)

    # ---- prefix cache ---------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> list[int]:
        """Blocks of the longest cached prefix of `tokens` (whole blocks), each with a reference taken."""
        if self.cache is None:
            return []
        blocks = self.cache.match(tokens)
        for b in blocks:
            if self._ref[b] == 0:
                self._num_evictable -= 1
            self._ref[b] += 1
        return blocks

    def cache_blocks(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Offer full blocks (held by a request, so ref > 0) to the prefix cache."""
        if self.cache is not None:
            self.cache.insert(tokens, blocks)

    def clear_cache(self) -> None:
        """Drop every cached prefix: evictable blocks go back to the free list."""
        if self.cache is None:
            return
        for b in self.cache.clear():
            if self._ref[b] == 0:
                self._free.append(b)
        self._num_evictable = 0
