"""Radix tree over full KV blocks, keyed by token ids (pure Python, no tensors).

An edge holds a run of whole blocks: `chunks` (one tuple of block_size token ids per block) and the block ids that
hold their K/V. Children are keyed by their first chunk. A request's decode extends its leaf in place, at a cost of
the new blocks only (never a copy of the whole edge). A match that ends inside an edge splits it there, so nodes stay
aligned with what requests share. The tree never decides whether a block is in use: `evict` asks the block
manager (`unused(block)`).

Invariant the block manager keeps (and `check` verifies with it): a block in use has every block above it (earlier
in its node, and in every ancestor node) in use too, so every unused cached block can be reached by evicting
unused tails of leaves, leaf after leaf. `insert` helps: it only hangs blocks under a path made of the caller's own
blocks.

Eviction never walks the tree: a heap of leaves keyed by their last use holds, for every leaf whose last block is
unused, an entry stamped with its current `last_access` (`check` verifies it). Entries are pushed when a leaf is
used, when a node becomes a leaf (its last child evicted), when a leaf's tail is trimmed, and when the block manager
says a leaf's last block became unused (`released`); entries gone stale (used again since, no longer a leaf, removed,
in use when popped) are dropped as they come up, and the heap is compacted once it holds twice as many entries as
the tree has nodes. So evicting k blocks costs about k heap operations, whatever the cache's size.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence

Key = tuple[int, ...]
MAX_FOLLOWED = 4096  # `follow` hints kept


class PrefixConflict(ValueError):
    """`insert` was asked to hang blocks under a cached prefix held by other blocks."""


class Node:
    __slots__ = ("chunks", "blocks", "children", "parent", "last_access")

    def __init__(self, chunks: list[Key], blocks: list[int], parent: "Node | None") -> None:
        self.chunks, self.blocks, self.parent = chunks, blocks, parent  # chunks[j]: the tokens of blocks[j]
        self.children: dict[Key, Node] = {}
        self.last_access = 0

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c]


class RadixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = Node([], [], None)
        self.block_node: dict[int, Node] = {}  # every cached block -> the node holding it
        self._clock = itertools.count(1)  # logical time for LRU
        self._followed: dict[int, tuple[Node, int]] = {}  # `follow`'s last block -> (its node, index there), a hint
        self._lru: list[tuple[int, int, Node]] = []  # heap of (last_access when pushed, tie-break, leaf): see above
        self._pushes = itertools.count()
        self.num_nodes = 0  # below the root
        self.heap_slack = 64  # entries beyond 2 per node before the heap is compacted (tests lower it)

    @property
    def num_blocks(self) -> int:
        return len(self.block_node)

    def __contains__(self, block: int) -> bool:
        return block in self.block_node

    def _chunks(self, tokens: Sequence[int]) -> list[Key]:
        bs = self.block_size
        return [tuple(tokens[i : i + bs]) for i in range(0, len(tokens) - len(tokens) % bs, bs)]

    def _split(self, node: Node, num_blocks: int) -> Node:
        """Cut `node` after its first num_blocks blocks; returns the new upper node (the old one keeps the rest)."""
        upper = Node(node.chunks[:num_blocks], node.blocks[:num_blocks], node.parent)
        upper.last_access = node.last_access
        self.num_nodes += 1
        assert node.parent is not None
        node.parent.children[node.chunks[0]] = upper
        node.chunks, node.blocks, node.parent = node.chunks[num_blocks:], node.blocks[num_blocks:], upper
        upper.children[node.chunks[0]] = node
        for b in upper.blocks:
            self.block_node[b] = upper
        return upper

    def _walk(self, chunks: list[Key], split: bool) -> tuple[Node, list[int], int]:
        """Deepest node matching a prefix of `chunks` -> (node, matched blocks, matched chunks). Without `split`
        a match ending inside an edge counts its blocks there, but the node returned is the edge's parent."""
        node, blocks, i = self.root, [], 0
        now = next(self._clock)
        while i < len(chunks) and (child := node.children.get(chunks[i])) is not None:
            n = len(child.blocks)
            k = 0
            while k < n and i + k < len(chunks) and child.chunks[k] == chunks[i + k]:
                k += 1
            if k < n:
                if not split:
                    blocks.extend(child.blocks[:k])
                    i += k
                    break
                child = self._split(child, k)
            self._use(child, now)
            blocks.extend(child.blocks)
            node, i = child, i + len(child.blocks)
        return node, blocks, i

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `tokens` (whole blocks only), most recent use noted."""
        _, blocks, _ = self._walk(self._chunks(tokens), split=True)
        return blocks

    def peek(self, tokens: Sequence[int]) -> list[int]:
        """Like `match`, without reshaping the tree."""
        return self._walk(self._chunks(tokens), split=False)[1]

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> list[int]:
        """Cache `blocks` as holding `tokens` (len(tokens) == len(blocks) * block_size). The cached prefix of
        `tokens` must already be these very blocks (the caller adopts the tree's blocks first): the tree never
        hangs a caller's blocks under blocks the caller may not hold. Returns the blocks the cache took."""
        chunks = self._chunks(tokens)
        assert len(chunks) == len(blocks), "insert whole blocks only"
        node, matched, i = self._walk(chunks, split=True)
        if matched != list(blocks[:i]):
            raise PrefixConflict("insert under a cached prefix held by other blocks (adopt the tree's blocks first)")
        if i == len(chunks):
            return []
        new = list(blocks[i:])
        leaf = Node(chunks[i:], new, node)
        node.children[chunks[i]] = leaf
        self.num_nodes += 1
        self._use(leaf, next(self._clock))
        for b in new:
            self.block_node[b] = leaf
        return list(new)  # the leaf's own list grows in place later

    def extend(self, after: int, tokens: Sequence[int], blocks: Sequence[int]) -> bool:
        """Cache `blocks` (holding `tokens`) right after the cached block `after`, without walking from the root:
        the common case of a request offering the blocks it filled since its last offer. False (nothing done)
        unless `after` ends its node and no child there starts with the same tokens; `insert` then decides."""
        node = self.block_node.get(after)
        if node is None or node.blocks[-1] != after:
            return False
        chunks = self._chunks(tokens)
        assert len(chunks) == len(blocks) and chunks, "extend by whole blocks"
        if chunks[0] in node.children:
            return False
        new = list(blocks)
        if node.children:  # a branch point: the new blocks are a new leaf
            leaf = Node(chunks, new, node)
            node.children[chunks[0]] = leaf
            self.num_nodes += 1
            node = leaf
        else:  # a leaf grows in place (appending keeps the tree's shape: no other path runs through it)
            node.chunks.extend(chunks)
            node.blocks.extend(new)
        self._use(node, next(self._clock))
        for b in new:
            self.block_node[b] = node
        return True

    def follow(self, after: int, tokens: Sequence[int]) -> list[int] | None:
        """The cached blocks right after the cached block `after` that hold a prefix of `tokens` (whole blocks),
        most recent use noted, without walking from the root; None if `after` is not cached. A request that
        follows a cached path block by block finds each `after` where its last call left it (no search of the
        node: a repeated long output is one node)."""
        node = self.block_node.get(after)
        if node is None:
            return None
        hint = self._followed.get(after)
        if hint is not None and hint[0] is node and hint[1] < len(node.blocks) and node.blocks[hint[1]] == after:
            k = hint[1]
        else:
            k = len(node.blocks) - 1
            while node.blocks[k] != after:
                k -= 1
        k += 1
        now = next(self._clock)
        found: list[int] = []
        last: tuple[Node, int] | None = None
        for chunk in self._chunks(tokens):
            if k == len(node.blocks):
                child = node.children.get(chunk)
                if child is None:
                    break
                node, k = child, 0
            elif node.chunks[k] != chunk:
                break
            if node.last_access != now:
                self._use(node, now)
            found.append(node.blocks[k])
            last = node, k
            k += 1
        if last is not None:
            if len(self._followed) >= MAX_FOLLOWED:  # requests that stopped following leave theirs behind
                self._followed.clear()
            self._followed[found[-1]] = last
        return found

    def _use(self, node: Node, now: int) -> None:
        """`node` was used at logical time `now`; a leaf is (again) a candidate for eviction from then."""
        node.last_access = now
        if not node.children:
            self._push(node)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._lru, (node.last_access, next(self._pushes), node))
        self._bound()

    def _bound(self) -> None:
        """Once the heap holds more than two entries per node, drop its stale entries (at most one per leaf
        stays): O(entries), once per ~num_nodes pushes or removals."""
        if len(self._lru) <= 2 * self.num_nodes + self.heap_slack:
            return
        seen: set[int] = set()
        live = []
        for entry in self._lru:
            stamp, _, node = entry
            if stamp == node.last_access and node.parent is not None and not node.children and id(node) not in seen:
                seen.add(id(node))
                live.append(entry)
        heapq.heapify(live)
        self._lru[:] = live  # in place: `evict` holds the list

    def released(self, block: int) -> None:
        """The block manager: cached `block` became unused. If it ends a leaf, that leaf is evictable from its
        last use on (it was passed over while the block was in use)."""
        node = self.block_node.get(block)
        if node is not None and node.blocks[-1] == block and not node.children:
            self._push(node)

    def evict(self, num_blocks: int, unused: Callable[[int], bool]) -> list[int]:
        """Remove up to num_blocks unused blocks from the tails of leaves, least recently used leaf first (a leaf
        whose blocks all go is removed, and its parent may become a leaf); returns the freed blocks. A leaf whose last
        block was in use at an earlier call is looked at again only once `released` said that block is unused."""
        heap = self._lru
        freed: list[int] = []
        while heap and len(freed) < num_blocks:
            stamp, _, node = heapq.heappop(heap)
            if stamp != node.last_access or node.parent is None or node.children or not unused(node.blocks[-1]):
                continue  # stale, or its last block in use (`released` pushes it again once unused)
            tail = 1  # unused blocks at the end of this leaf
            while tail < len(node.blocks) and unused(node.blocks[-1 - tail]):
                tail += 1
            take = min(tail, num_blocks - len(freed))
            if take < len(node.blocks):  # trim the leaf's tail: the rest stays cached
                gone = node.blocks[-take:]
                del node.blocks[-take:], node.chunks[-take:]
                for b in gone:
                    del self.block_node[b]
                freed.extend(gone)
                if take < tail:  # it still ends with unused blocks
                    self._push(node)
                continue
            parent = node.parent
            del parent.children[node.chunks[0]]
            node.parent = None  # (its heap entries are stale from now on)
            self.num_nodes -= 1
            for b in node.blocks:
                del self.block_node[b]
            freed.extend(node.blocks)
            if parent is not self.root and not parent.children and unused(parent.blocks[-1]):
                self._push(parent)
        self._bound()
        return freed

    def nodes(self) -> Iterator[Node]:
        """Every node below the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def clear(self) -> list[int]:
        """Forget everything; returns every block the cache held."""
        blocks = list(self.block_node)
        self.root.children.clear()
        self.block_node.clear()
        self._followed.clear()
        self._lru.clear()
        self.num_nodes = 0
        return blocks

    def check(self, unused: Callable[[int], bool]) -> None:
        """Raise AssertionError if the tree is malformed or an unused block cannot be reached by eviction."""
        seen = nodes = 0
        queued = {id(n) for stamp, _, n in self._lru if stamp == n.last_access}
        for node in self.nodes():
            nodes += 1
            if not node.children and unused(node.blocks[-1]):
                assert id(node) in queued, f"evictable leaf {node.blocks} has no current entry in the eviction heap"
            parent = node.parent
            assert parent is not None and node.blocks, "a node without blocks or parent"
            assert len(node.chunks) == len(node.blocks), "chunks and blocks of a node disagree"
            assert all(len(c) == self.block_size for c in node.chunks), "a chunk that is not one block"
            assert parent.children.get(node.chunks[0]) is node, "a child keyed by the wrong tokens"
            for b in node.blocks:
                assert self.block_node.get(b) is node, f"block {b} indexed under another node"
            seen += len(node.blocks)
            # in use => everything above it in use: blocks before it in the node, and the parent's last block
            flags = [not unused(b) for b in node.blocks]
            assert flags == sorted(flags, reverse=True), f"an unused block above a used one in node {node.blocks}"
            if flags[0] and parent is not self.root:
                assert not unused(parent.blocks[-1]), f"block {node.blocks[0]} in use under an unused parent"
        assert seen == len(self.block_node), "blocks indexed but not in the tree (or twice in it)"
        assert nodes == self.num_nodes, f"{self.num_nodes} nodes counted, {nodes} in the tree"
        assert len(self._lru) <= 2 * self.num_nodes + self.heap_slack, "the eviction heap was not compacted"
