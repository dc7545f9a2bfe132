"""Radix tree and block manager with prefix caching: insert, match, split, LRU eviction, reference counts."""
from __future__ import annotations

import pytest

from asyncllm.engine.kv_cache import BlockManager
from asyncllm.engine.radix_cache import PrefixConflict, RadixCache

BS = 4


def toks(*blocks):
    """Tokens of whole blocks, block i filled with the value blocks[i]."""
    return [v for b in blocks for v in [b] * BS]


def test_insert_and_match_whole_blocks_only():
    c = RadixCache(BS)
    assert c.insert(toks(1, 2, 3), [10, 11, 12]) == [10, 11, 12]
    assert c.match(toks(1, 2, 3)) == [10, 11, 12]
    assert c.match(toks(1, 2)) == [10, 11]
    assert c.match(toks(1, 2, 3, 4)) == [10, 11, 12]
    assert c.match(toks(1, 2) + [3, 3]) == [10, 11]  # a partial block never matches
    assert c.match(toks(2)) == []
    assert c.num_blocks == 3 and 11 in c and 13 not in c


def test_split_on_diverging_insert_and_on_partial_match():
    c = RadixCache(BS)
    c.insert(toks(1, 2, 3, 4), [10, 11, 12, 13])
    # same first two blocks, then a different third: the edge splits after block 2
    with pytest.raises(PrefixConflict, match="adopt"):  # never hang blocks under a prefix held by other blocks
        c.insert(toks(1, 2, 7), [20, 21, 22])
    assert c.insert(toks(1, 2, 7), [10, 11, 22]) == [22]
    top = c.root.children[tuple(toks(1))]
    assert top.blocks == [10, 11] and set(top.children) == {tuple(toks(3)), tuple(toks(7))}
    assert c.match(toks(1, 2, 7, 9)) == [10, 11, 22]
    # a match ending inside an edge splits it there
    c.match(toks(1, 2, 3))
    node = c.block_node[12]
    assert node.blocks == [12] and c.block_node[13].blocks == [13] and c.block_node[13].parent is node


def test_evict_lru_leaves_of_unused_blocks_only():
    c = RadixCache(BS)
    c.insert(toks(1, 2), [10, 11])
    c.insert(toks(1, 3), [10, 12])  # 10 shared: node (1) with children (2), (3)
    c.insert(toks(5), [15])
    c.match(toks(1, 2))  # touch the (1)->(2) branch: (1,3) and (5) are older
    used = {11}
    assert c.evict(1, lambda b: b not in used) == [12]  # oldest unused leaf first
    assert c.evict(1, lambda b: b not in used) == [15]
    assert c.evict(5, lambda b: b not in used) == []  # (1)->(2) is in use, and (1) is not a leaf
    used.clear()
    c.released(11)  # (the block manager says so when a cached block's last reference goes)
    assert sorted(c.evict(5, lambda b: True)) == [10, 11]  # leaf, then its parent once it became a leaf
    assert c.num_blocks == 0 and not c.root.children


def test_block_manager_refcounts_with_cache():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    a = bm.allocate(3)
    bm.cache_blocks(toks(1, 2, 3), a)
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 3
    shared = bm.match(toks(1, 2, 9))
    assert shared == a[:2] and [bm.ref_count(b) for b in a] == [2, 2, 1]
    bm.free(a)  # the first request ends: its blocks stay cached
    assert [bm.ref_count(b) for b in a] == [1, 1, 0]
    assert bm.num_free_blocks == 4  # 3 free + 1 evictable
    bm.free(shared)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(shared[:1])
    assert min(bm.ref_count(b) for b in range(6)) == 0  # never negative
    # allocation takes free blocks first, then evicts cached ones
    got = bm.allocate(5)
    assert len(set(got)) == 5 and bm.num_cached_blocks == 1 and bm.num_free_blocks == 1
    bm.free(got)
    bm.clear_cache()
    assert bm.num_cached_blocks == 0 and len(bm._free) == 6


def test_match_revives_evictable_blocks():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = bm.allocate(2)
    bm.cache_blocks(toks(1, 2), a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert bm.match(toks(1, 2)) == a and bm.num_free_blocks == 2
    assert bm.allocate(2) and bm.num_free_blocks == 0  # the matched blocks were not evicted


def test_extend_from_the_last_cached_block():
    c = RadixCache(BS)
    c.insert(toks(1, 2), [10, 11])
    assert c.extend(11, toks(3), [12])  # a leaf grows in place
    assert c.peek(toks(1, 2, 3)) == [10, 11, 12] and len(c.root.children) == 1
    assert not c.extend(11, toks(4), [13])  # 11 no longer ends its node: insert decides
    assert not c.extend(99, toks(4), [13])  # not cached
    c.insert(toks(1, 2, 3, 5), [10, 11, 12, 14])
    assert not c.extend(12, toks(5), [15])  # another request cached this continuation: insert adopts
    assert c.extend(12, toks(6, 7), [16, 17])  # a branch point: a new leaf
    assert c.peek(toks(1, 2, 3, 6, 7)) == [10, 11, 12, 16, 17] and c.peek(toks(1, 2, 3, 5)) == [10, 11, 12, 14]
    assert c.match(toks(1, 2, 3, 6)) == [10, 11, 12, 16]  # matching inside the grown leaf splits it as usual
    c.check(lambda b: True)
