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
