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

from asyncllm.engine.radix_cache import PrefixConflict, RadixCache


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
            # (the least recently used leaves' tails: a few heap operations per block, never a walk of the tree)
            evicted = self.cache.evict(num_blocks - len(self._free), lambda b: self._ref[b] == 0)
            self._num_evictable -= len(evicted)
            self._free.extend(evicted)
            if num_blocks > len(self._free):  # cannot happen while check_invariants holds
                raise RuntimeError(f"KV cache accounting: {self._num_evictable} blocks counted evictable, "
                                   f"{len(evicted)} could be evicted")
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
                    self.cache.released(b)
                else:
                    self._free.append(b)

    # ---- prefix cache ---------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> list[int]:
        """Blocks of the longest cached prefix of `tokens` (whole blocks), each with a reference taken."""
        if self.cache is None:
            return []
        blocks = self.cache.match(tokens)
        for b in blocks:
            self._hold(b)
        return blocks

    def cache_blocks(self, tokens: Sequence[int], table: list[int], num_written: int | None = None,
                     num_cached: int = 0, num_blocks: int | None = None) -> bool:
        """Offer a request's full blocks to the prefix cache: `table[:k]` holds `tokens[:k * block_size]` (k =
        `num_blocks`, default len(tokens) // block_size) and the request holds a reference to each.

        Where the tree already holds other blocks for a prefix of `tokens` (another request computed the same
        prefix), the request first adopts the tree's blocks (a reference taken on each, its own copies freed, `table`
        changed in place), so the tree never hangs blocks under blocks the request does not hold. Only blocks whose
        K/V earlier steps wrote (`table[:num_written]`, default all) may be swapped: the switch then changes only
        what later steps read, and the copies freed are reused only by later steps on the same stream. If a copy
        is still being written, nothing is cached now and False is returned (the next step tries again).
        `num_cached`: leading blocks of `table` this request offered before (and the tree still holds)."""
        if self.cache is None:
            return False
        bs = self.block_size
        k = len(tokens) // bs if num_blocks is None else num_blocks
        limit = k if num_written is None else num_written
        if 0 < num_cached < k:  # the usual case during decode: lookups from the last offered block, no walk
            after, rest = table[num_cached - 1], tokens[num_cached * bs : k * bs]
            if self.cache.extend(after, rest, table[num_cached:k]):
                return True
            # the tree already holds what follows (a repeated request's own output): adopt those blocks
            path = self.cache.follow(after, rest)
            if path:
                if not self._adopt(table, num_cached, path, limit):
                    return False
                if num_cached + len(path) == k:
                    return True
        try:  # the usual case: the cached prefix is the request's own blocks (one walk of the tree)
            self.cache.insert(tokens[: k * bs], table[:k])
            return True
        except PrefixConflict:  # nothing was inserted; the walk may have split nodes, which changes no content
            pass
        if not self._adopt(table, 0, self.cache.peek(tokens[: k * bs]), limit):
            return False
        self.cache.insert(tokens[: k * bs], table[:k])
        return True

    def _adopt(self, table: list[int], start: int, path: list[int], limit: int) -> bool:
        """The cached blocks `path` hold what `table[start:start + len(path)]` holds: take a reference on each
        that differs and free the request's copies (`table` changed in place). False, and nothing done, when a
        copy to free is at or past `limit` (its K/V may still be being written)."""
        own = next((j for j, (a, b) in enumerate(zip(path, table[start:])) if a != b), len(path))
        if own == len(path):
            return True
        if start + len(path) > limit:
            return False
        for b in path[own:]:
            self._hold(b)
        self.free(table[start + own : start + len(path)])
        table[start + own : start + len(path)] = path[own:]
        return True

    def _hold(self, block: int) -> None:
        if self._ref[block] == 0:
            self._num_evictable -= 1
        self._ref[block] += 1

    def clear_cache(self) -> None:
        """Drop every cached prefix: evictable blocks go back to the free list."""
        if self.cache is None:
            return
        for b in self.cache.clear():
            if self._ref[b] == 0:
                self._free.append(b)
        self._num_evictable = 0

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is in exactly one state (free / in use / evictable), the counts
        agree, and every evictable block can be reached by eviction. For tests: O(blocks)."""
        free = list(self._free)
        assert len(set(free)) == len(free), "a block twice in the free list"
        cached = set(self.cache.block_node) if self.cache is not None else set()
        for b in free:
            assert self._ref[b] == 0 and b not in cached, f"free block {b} is in use or cached"
        assert all(r >= 0 for r in self._ref), "a negative reference count"
        evictable = [b for b in cached if self._ref[b] == 0]
        in_use = sum(r > 0 for r in self._ref)
        assert len(evictable) == self._num_evictable, f"{self._num_evictable} evictable counted, {len(evictable)} found"
        assert len(free) + in_use + len(evictable) == self.num_blocks, "a block in no state, or in two"
        if self.cache is not None:
            self.cache.check(lambda b: self._ref[b] == 0)
