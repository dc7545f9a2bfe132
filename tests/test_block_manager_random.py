"""BlockManager + RadixCache under random operation sequences (hypothesis), invariants checked after each one.

A model of what every block holds (`content[b]`: the token prefix whose last block's K/V it stores) checks that
the cache only ever hands out blocks holding exactly the prefix asked for. ASYNCLLM_RANDOM_EXAMPLES=3000 runs more.
"""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm.engine.kv_cache import BlockManager

BS = 2


class Model:
    """Requests as (tokens, table, blocks written by earlier steps, leading blocks offered to the cache), over one
    BlockManager."""

    def __init__(self, num_blocks: int) -> None:
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=True)
        self.reqs: list[dict] = []
        self.content: dict[int, tuple[int, ...]] = {}

    def write(self, req: dict, upto: int) -> None:
        """The request's blocks [written, upto) get their K/V (a step ran)."""
        for j in range(req["written"], upto):
            self.content[req["table"][j]] = tuple(req["tokens"][: (j + 1) * BS])
        req["written"] = max(req["written"], upto)

    def check(self) -> None:
        self.bm.check_invariants()
        refs = [0] * self.bm.num_blocks
        for r in self.reqs:
            for j, b in enumerate(r["table"]):
                refs[b] += 1
                if j < r["written"]:  # what a request reads is its own prefix
                    assert self.content[b] == tuple(r["tokens"][: (j + 1) * BS])
        assert refs == [self.bm.ref_count(b) for b in range(self.bm.num_blocks)]
        cache = self.bm.cache
        for b, node in cache.block_node.items():  # a cached block holds the path's tokens up to it
            path: list[int] = []
            n = node
            while n is not cache.root:
                path[:0] = n.tokens
                n = n.parent
            upto = len(path) - (len(node.blocks) - 1 - node.blocks.index(b)) * BS
            assert self.content[b] == tuple(path[:upto])


chunk = st.sampled_from([(1, 1), (1, 2), (2, 2), (3, 1)])  # few distinct blocks: prefixes collide a lot
op = st.one_of(
    st.tuples(st.just("admit"), st.lists(chunk, min_size=1, max_size=6)),
    st.tuples(st.just("grow"), st.integers(0, 99), st.lists(chunk, min_size=1, max_size=3)),
    # a request grows by what another holds next (a repeated request decoding the same output)
    st.tuples(st.just("echo"), st.integers(0, 99), st.integers(0, 99), st.integers(1, 3)),
    st.tuples(st.just("step"), st.integers(0, 99), st.integers(0, 6), st.booleans()),
    st.tuples(st.just("free"), st.integers(0, 99)),
    st.tuples(st.just("pressure"), st.integers(1, 12)),
    st.tuples(st.just("clear"),),
)


@settings(max_examples=int(os.environ.get("ASYNCLLM_RANDOM_EXAMPLES", 300)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(4, 16), heap_slack=st.integers(0, 3), ops=st.lists(op, max_size=40))
def test_random_operations_keep_invariants(num_blocks, heap_slack, ops):
    run(num_blocks, heap_slack, ops)


@pytest.mark.parametrize("seed", range(int(os.environ.get("ASYNCLLM_RANDOM_EXAMPLES", 300)) // 3))
def test_repeated_requests_decoding_the_same_output_keep_invariants(seed):
    """Requests that repeat others' tokens block by block (a repeated prompt with the same seeded output) adopt the
    cached copies as they decode, under frees and memory pressure."""
    rng = random.Random(seed)
    first = [rng.randrange(3) for _ in range(24)]
    shared = rng.randrange(0, 24, BS)  # the two outputs part after a common prefix (often inside a cached node)
    bases = [first, first[:shared] + [rng.randrange(3) for _ in range(24 - shared)]]
    ops: list[tuple] = []
    for _ in range(60):
        kind = rng.choices(["admit", "echo", "step", "free", "pressure"], [2, 6, 8, 1, 1])[0]
        if kind == "admit":
            base = rng.choice(bases)
            ops.append(("admit", [tuple(base[j : j + BS]) for j in range(0, BS * rng.randint(1, 3), BS)]))
        elif kind == "echo":
            ops.append(("echo", rng.randrange(99), rng.randrange(99), rng.randint(1, 2)))
        elif kind == "step":
            ops.append(("step", rng.randrange(99), rng.randint(0, 3), rng.random() < 0.8))
        elif kind == "free":
            ops.append(("free", rng.randrange(99)))
        else:
            ops.append(("pressure", rng.randint(1, 6)))
    run(rng.randint(8, 24), rng.randint(1, 4), ops, grow_from=bases)


def run(num_blocks: int, heap_slack: int, ops: list[tuple], grow_from: list[list[int]] | None = None) -> None:
    m = Model(num_blocks)
    bm = m.bm
    bm.cache.heap_slack = heap_slack  # small: the eviction heap is compacted often
    for o in ops:
        kind = o[0]
        r = m.reqs[o[1] % len(m.reqs)] if m.reqs and kind in ("grow", "echo", "step", "free") else None
        if kind == "admit":
            tokens = [t for c in o[1] for t in c]
            cached = bm.match(tokens[: (len(tokens) - 1) // BS * BS])
            need = len(o[1]) - len(cached)
            if bm.can_allocate(need):
                req = {"tokens": tokens, "table": cached + bm.allocate(need), "written": len(cached),
                       "cached": len(cached)}
                m.reqs.append(req)
            else:
                bm.free(cached)
        elif kind == "grow" and r is not None and bm.can_allocate(len(o[2])):
            r["tokens"] += [t for c in o[2] for t in c]
            r["table"] += bm.allocate(len(o[2]))
        elif kind == "echo" and r is not None:
            srcs = [q["tokens"] for q in m.reqs] + (grow_from or [])
            src = srcs[o[2] % len(srcs)]
            n = len(r["tokens"])
            more = src[n : n + o[3] * BS] if src[:n] == r["tokens"] else []
            more = more[: len(more) // BS * BS]
            if more and bm.can_allocate(len(more) // BS):
                r["tokens"] += more
                r["table"] += bm.allocate(len(more) // BS)
        elif kind == "step" and r is not None:  # as the scheduler: offer the blocks this step fills, then run it
            k = min(len(r["table"]), r["written"] + o[2])
            table_before = list(r["table"])
            # with the hint (as the scheduler passes it) the blocks offered since the last offer extend the tree;
            # the scheduler passes all of a request's tokens and the block count, the hint-less form a slice
            ok = bm.cache_blocks(r["tokens"], r["table"], r["written"], r["cached"], k) if o[3] else \
                bm.cache_blocks(r["tokens"][: k * BS], r["table"], r["written"])
            changed = [j for j in range(len(table_before)) if table_before[j] != r["table"][j]]
            assert all(j < r["written"] for j in changed), "swapped a block still being written"
            if ok:  # the offered blocks are a cached path now
                assert bm.cache.peek(r["tokens"][: k * BS]) == r["table"][:k]
                r["cached"] = max(r["cached"], k)
            m.write(r, k)
        elif kind == "free" and r is not None:
            bm.free(r["table"])
            m.reqs.remove(r)
        elif kind == "pressure" and bm.can_allocate(o[1]):
            got = bm.allocate(o[1])  # must succeed whenever can_allocate says so
            assert len(set(got)) == o[1]
            for b in got:
                m.content.pop(b, None)
            bm.free(got)
        elif kind == "clear":
            bm.clear_cache()
        m.check()
    for r in m.reqs:
        bm.free(r["table"])
    m.reqs.clear()
    m.check()
    assert bm.num_free_blocks == num_blocks and bm.can_allocate(num_blocks)
    assert len(bm.allocate(num_blocks)) == num_blocks


def test_issue_repro_second_insert_under_blocks_it_does_not_hold():
    """Two requests with the same first blocks cached in one step; the first ends: allocation must not fail."""
    bm = BlockManager(5, 4, True)
    a, c = bm.allocate(2), bm.allocate(3)
    bm.cache_blocks([1] * 4 + [2] * 4, a)
    bm.cache_blocks([1] * 4 + [2] * 4 + [3] * 4, c)
    bm.check_invariants()
    assert c[:2] == a  # c adopted the cached copies of the shared prefix and freed its own
    bm.free(a)
    assert bm.allocate(1)
    bm.check_invariants()


def test_a_repeated_request_adopts_the_cached_continuation_without_walking_from_the_root(monkeypatch):
    """Request b repeats a's tokens: each block b offers after its first is found after b's last offered block."""
    bm = BlockManager(12, 2, True)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    a = bm.allocate(4)
    assert bm.cache_blocks(tokens, a)
    b = bm.match(tokens[:2]) + bm.allocate(3)  # its first block matched, then its own copies
    assert b[0] == a[0] and bm.num_free_blocks == 12 - 7

    def walk(*args, **kwargs):
        raise AssertionError("walked the tree from the root")

    monkeypatch.setattr(bm.cache, "_walk", walk)
    assert not bm.cache_blocks(tokens, b, num_written=2, num_cached=1, num_blocks=3)  # b[2] written this step
    assert b[1:] != a[1:4]
    assert bm.cache_blocks(tokens, b, num_written=3, num_cached=1, num_blocks=3)
    assert b[:3] == a[:3] and bm.num_free_blocks == 12 - 5  # two copies freed
    assert bm.cache_blocks(tokens, b, num_written=4, num_cached=3, num_blocks=4)
    assert b == a and bm.num_free_blocks == 12 - 4
    monkeypatch.undo()
    bm.check_invariants()
    for t in (a, b):
        bm.free(t)
    bm.check_invariants()
    assert bm.num_free_blocks == 12


def test_an_output_that_parts_inside_a_cached_node_keeps_its_own_blocks():
    bm = BlockManager(8, 2, True)
    a = bm.allocate(2)
    assert bm.cache_blocks([1, 2, 3, 4], a)
    c = bm.match([1, 2]) + bm.allocate(2)  # c repeats a's first two blocks, then parts from it
    assert bm.cache_blocks([1, 2, 3, 4, 9, 9], c, num_written=2, num_cached=1, num_blocks=2)
    assert c[:2] == a  # adopted a's second block (found after its first: the node is not split)
    a += bm.allocate(1)
    assert bm.cache_blocks([1, 2, 3, 4, 5, 6], a, num_written=3, num_cached=2, num_blocks=3)  # a's leaf grows
    own = c[2]
    assert bm.cache_blocks([1, 2, 3, 4, 9, 9], c, num_written=3, num_cached=2, num_blocks=3)
    assert c[2] == own and bm.cache.peek([1, 2, 3, 4, 9, 9]) == c and bm.cache.peek([1, 2, 3, 4, 5, 6]) == a
    bm.check_invariants()


def test_copies_still_being_written_are_not_swapped():
    bm = BlockManager(6, 4, True)
    a, c = bm.allocate(2), bm.allocate(3)
    bm.cache_blocks([1] * 4 + [2] * 4, a)
    table = list(c)
    assert not bm.cache_blocks([1] * 4 + [2] * 4 + [3] * 4, c, num_written=1)  # c's 2nd block written this step
    assert c == table and bm.num_cached_blocks == 2
    bm.check_invariants()
    bm.free(a)  # a's blocks stay cached but unused: they must be evictable
    assert bm.num_free_blocks == 1 + 2 and len(bm.allocate(3)) == 3
    bm.check_invariants()


def test_check_invariants_catches_a_broken_count():
    bm = BlockManager(4, 4, True)
    a = bm.allocate(2)
    bm.cache_blocks([1] * 8, a)
    bm._num_evictable += 1
    with pytest.raises(AssertionError):
        bm.check_invariants()
