"""Radix tree over full KV blocks, keyed by token ids (pure Python, no tensors).

An edge holds a run of whole blocks: `tokens` (a multiple of block_size) and the block ids that hold their K/V.
Children are keyed by their first block's tokens. A match that ends inside an edge splits it there, so nodes stay
aligned with what requests share. The tree never decides whether a block is in use: `evict` asks the block
manager (`unused(block)`) and drops least-recently-used leaves whose blocks are all unused.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

Key = tuple[int, ...]


class Node:
    __slots__ = ("tokens", "blocks", "children", "parent", "last_access")

    def __init__(self, tokens: Key, blocks: list[int], parent: "Node | None") -> None:
        self.tokens, self.blocks, self.parent = tokens, blocks, parent
        self.children: dict[Key, Node] = {}
        self.last_access = 0


class RadixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = Node((), [], None)
        self.block_node: dict[int, Node] = {}  # every cached block -> the node holding it
        self._clock = itertools.count(1)  # logical time for LRU

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
        cut = num_blocks * self.block_size
        upper = Node(node.tokens[:cut], node.blocks[:num_blocks], node.parent)
        upper.last_access = node.last_access
        assert node.parent is not None
        node.parent.children[node.tokens[: self.block_size]] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[num_blocks:], upper
        upper.children[node.tokens[: self.block_size]] = node
        for b in upper.blocks:
            self.block_node[b] = upper
        return upper

    def _walk(self, chunks: list[Key], split: bool) -> tuple[Node, list[int], int]:
        """Deepest node matching a prefix of `chunks` -> (node, matched blocks, matched chunks)."""
        node, blocks, i = self.root, [], 0
        now = next(self._clock)
        while i < len(chunks) and (child := node.children.get(chunks[i])) is not None:
            n = len(child.blocks)
            k = 0
            while k < n and i + k < len(chunks) and child.tokens[k * self.block_size : (k + 1) * self.block_size] == chunks[i + k]:
                k += 1
            if k < n:
                if not split:
                    blocks.extend(child.blocks[:k])
                    i += k
                    break
                child = self._split(child, k)
            child.last_access = now
            blocks.extend(child.blocks)
            node, i = child, i + len(child.blocks)
        return node, blocks, i

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `tokens` (whole blocks only), most recent use noted."""
        _, blocks, _ = self._walk(self._chunks(tokens), split=True)
        return blocks

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> list[int]:
        """Cache `blocks` as holding `tokens` (len(tokens) == len(blocks) * block_size). Positions already cached
        keep their existing blocks; returns the blocks of `blocks` that the cache took."""
        chunks = self._chunks(tokens)
        assert len(chunks) == len(blocks), "insert whole blocks only"
        node, _, i = self._walk(chunks, split=True)
        if i == len(chunks):
            return []
        new = list(blocks[i:])
        leaf = Node(tuple(t for c in chunks[i:] for t in c), new, node)
        leaf.last_access = next(self._clock)
        node.children[chunks[i]] = leaf
        for b in new:
            self.block_node[b] = leaf
        return new

    def evict(self, num_blocks: int, unused: Callable[[int], bool]) -> list[int]:
        """Remove least-recently-used leaves whose blocks are all unused until num_blocks are freed (or none is
        left; the last leaf may lose only its tail); returns the freed blocks."""
        heap = [(n.last_access, id(n), n) for n in self._leaves() if all(map(unused, n.blocks))]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_blocks:
            _, _, node = heapq.heappop(heap)
            take = num_blocks - len(freed)
            if take < len(node.blocks):  # trim the leaf's tail: evict no more than asked
                tail = node.blocks[-take:]
                node.blocks, node.tokens = node.blocks[:-take], node.tokens[: -take * self.block_size]
                for b in tail:
                    del self.block_node[b]
                freed.extend(tail)
                break
            parent = node.parent
            assert parent is not None
            del parent.children[node.tokens[: self.block_size]]
            for b in node.blocks:
                del self.block_node[b]
            freed.extend(node.blocks)
            if parent is not self.root and not parent.children and all(map(unused, parent.blocks)):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def clear(self) -> list[int]:
        """Forget everything; returns every block the cache held."""
        blocks = list(self.block_node)
        self.root.children.clear()
        self.block_node.clear()
        return blocks
