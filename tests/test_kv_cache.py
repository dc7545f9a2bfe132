import pytest

from asyncllm.engine.kv_cache import BlockManager


def test_allocate_free_roundtrip():
    bm = BlockManager(8, 16)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(1) == 1 and bm.blocks_for(16) == 1 and bm.blocks_for(17) == 2
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8 and bm.num_free_blocks == 0 and bm.usage == 1.0
    assert not bm.can_allocate(1)
    with pytest.raises(RuntimeError):
        bm.allocate(1)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.can_allocate(3) and not bm.can_allocate(4)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_double_free_is_refused():
    bm = BlockManager(4, 16)
    blocks = bm.allocate(2)
    bm.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(blocks[:1])
    assert bm.num_free_blocks == 4


def test_a_full_prefix_cache_is_evicted_least_recently_used_first_without_walking_the_tree(monkeypatch):
    """On a cache full of finished requests, blocks taken one at a time (as decode steps take them) are the least
    recently used requests' blocks, each eviction frees only what is asked, and none walks the tree (a walk per
    eviction, or per batch of them, costs the loop milliseconds on a cache of 100k blocks)."""
    import random

    rng = random.Random(0)
    bm = BlockManager(64 * 200, 4, enable_prefix_caching=True)
    order = []
    while bm.can_allocate(10) and bm.cache.num_blocks + 10 <= bm.num_blocks:
        table = bm.allocate(10)
        bm.cache_blocks([rng.randrange(1000) for _ in range(40)], table)
        bm.free(table)
        order.append(table)
    bm.match([t for t in bm.cache.block_node[order[5][0]].tokens])  # request 5 is used again: evicted last
    asked = []
    evict = bm.cache.evict
    bm.cache.evict = lambda n, unused: asked.append(n) or evict(n, unused)  # type: ignore[method-assign]

    def walk():
        raise AssertionError("eviction walked the tree")

    monkeypatch.setattr(bm.cache, "nodes", walk)
    taken = [b for _ in range(400) for b in bm.allocate(1)]
    assert asked == [1] * 400
    assert set(taken) == {b for table in order[:41] if table is not order[5] for b in table}
    assert set(taken).isdisjoint(order[5])
    monkeypatch.undo()
    bm.check_invariants()
