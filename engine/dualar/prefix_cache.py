"""Prefix cache: the slow AR's keys and values of prompt prefixes, kept for reuse (a radix tree).

Keys. A prompt is a (1 + C, T) int matrix (``prompt.py``); the key of position t is its whole column: the token id
and all C codes. Two audio positions therefore match only when every code of the frame agrees — never on the
semantic code alone — and a text position (codes 0) never matches an audio one. A frame the model generated,
``[main token; semantic code; residual codes]``, is exactly the column the next turn's prompt holds for that frame
of assistant audio, so a turn stored with its generated frames is matched by the next turn's prompt through its
audio, and a turn cut at k frames (barge-in) still matches through those k frames.

Values. The KV of positions [a, b) is one tensor with the positions along ``position_dim`` (for the slow AR,
``SlowAR.read_kv``: (n_layer, 2, K, n, E), position_dim 3). The KV at position t depends only on columns 0..t (the
model is causal and RoPE uses absolute positions), so a stored prefix is valid for every prompt that starts with it.

Contract of :class:`PrefixCache`. One thread owns a cache (the scheduler's); ``stats`` may be read from any thread.

- ``match_prefix(key)`` -> :class:`PrefixMatch` ``(length, node, values)``: the longest stored prefix of ``key``,
  the node it ends in, and tensors covering positions [0, length) in order. Counts a hit (length > 0) or a miss and
  the positions reused, and refreshes the LRU time of the path. It does not lock: lock ``node`` before anything
  may evict (the next insert) and read ``values`` while it is locked.
- ``lock(node)`` / ``unlock(node)``: a locked node and all its ancestors are never evicted. Locks count: each lock
  needs one unlock. A later insert may split a node; a handle stays valid and keeps its whole path locked.
- ``insert_prefix(key, read)`` -> :class:`PrefixInsert` ``(length, new)``: store the positions of ``key`` not
  stored yet; ``read(a, b)`` returns the values of positions [a, b) and is called only for those. Room is made by
  evicting; if the bound still does not allow everything, the longest prefix that fits is stored (``length``:
  how much of ``key`` is cached now).
- ``evict(nbytes)`` -> bytes freed: drops least recently used unlocked leaves (a parent left childless becomes a
  leaf in turn) until ``nbytes`` are freed or nothing unlocked is left.
- ``stats()`` -> :class:`CacheStats`.

:class:`RadixCache` implements it as a radix tree whose edges are runs of positions (after mini-sglang's
``radix_cache.py``), each node holding its run's values as one tensor, bounded by ``capacity_bytes``.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CacheStats", "Node", "PrefixCache", "PrefixInsert", "PrefixMatch", "RadixCache"]

ReadValues = Callable[[int, int], Tensor]  # (start, end) -> values of positions [start, end)


class CacheStats(NamedTuple):
    hits: int  # matches that reused at least one position
    misses: int  # matches that reused nothing
    tokens_reused: int  # positions served from the cache, summed over matches
    tokens_held: int  # positions stored now
    bytes_held: int  # bytes of stored values now
    evicted_bytes: int  # bytes dropped by eviction, in all
    nodes: int  # tree nodes now (root excluded)


class Node:
    """A run of positions: its keys (n, W), its values, children keyed by their first position's column."""

    __slots__ = ("children", "first", "key", "last_used", "lock_ref", "parent", "value")

    def __init__(self, key: Tensor, value: Tensor | None, parent: Node | None) -> None:
        self.key = key  # (n, W) int64 on the CPU: one row per position
        self.value = value  # positions along the cache's position_dim; None for the root
        self.parent = parent
        self.first: tuple[int, ...] = tuple(key[0].tolist()) if len(key) else ()
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.last_used = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()


class PrefixMatch(NamedTuple):
    length: int  # positions of the key found in the cache
    node: Node  # where the match ends (the root when nothing matched): what to lock
    values: list[Tensor]  # covering positions [0, length), in order


class PrefixInsert(NamedTuple):
    length: int  # positions of the key cached after the call (a prefix of the key)
    new: int  # positions this call stored


class PrefixCache(ABC):
    """Values of key prefixes, longest-prefix matched, memory bounded, LRU-evicted. See the module docstring."""

    @abstractmethod
    def match_prefix(self, key: Tensor) -> PrefixMatch:
        """Longest stored prefix of ``key`` (W, T). Counts a hit or a miss; does not lock."""

    @abstractmethod
    def insert_prefix(self, key: Tensor, read: ReadValues) -> PrefixInsert:
        """Store ``key`` (W, T); ``read(a, b)`` gives values only for positions not stored yet."""

    @abstractmethod
    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction until :meth:`unlock`."""

    @abstractmethod
    def unlock(self, node: Node) -> None:
        """Undo one :meth:`lock` of ``node``."""

    @abstractmethod
    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` from unlocked entries, least recently used first, if possible; bytes freed."""

    @abstractmethod
    def stats(self) -> CacheStats:
        """Counters and gauges (a snapshot)."""


class RadixCache(PrefixCache):
    def __init__(self, capacity_bytes: int, *, position_dim: int = 3) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes, self.position_dim = capacity_bytes, position_dim
        self.root = Node(torch.zeros(0, 0, dtype=torch.long), None, None)
        self._clock = itertools.count(1)
        self._hits = self._misses = self._reused = self._evicted = 0
        self._tokens = self._bytes = self._nodes = 0

    # ---- contract

    def match_prefix(self, key: Tensor) -> PrefixMatch:
        node, length, _ = self._walk(self._rows(key))
        values: list[Tensor] = []
        cursor = node
        while cursor.parent is not None:  # the path's values, root-down; the last node may be matched in part
            assert cursor.value is not None
            values.append(cursor.value)
            cursor = cursor.parent
        values.reverse()
        d = self.position_dim
        excess = sum(v.shape[d] for v in values) - length
        if excess > 0:
            values[-1] = values[-1].narrow(d, 0, values[-1].shape[d] - excess)
        if length:
            self._hits += 1
            self._reused += length
        else:
            self._misses += 1
        return PrefixMatch(length, node, values)

    def insert_prefix(self, key: Tensor, read: ReadValues) -> PrefixInsert:
        rows = self._rows(key)
        node, length, inside = self._walk(rows)
        if length == len(rows):
            return PrefixInsert(length, 0)
        if inside < len(node.key):  # the key leaves this run part way: split it there
            node = self._split(node, inside)
        values = read(length, len(rows))
        count = len(rows) - length
        if values.shape[self.position_dim] != count:
            raise ValueError(f"read({length}, {len(rows)}) gave {values.shape[self.position_dim]} positions")
        per_position = values.numel() * values.element_size() // count
        self.lock(node)  # the path we extend stays
        try:
            over = self._bytes + count * per_position - self.capacity_bytes
            if over > 0:
                self.evict(over)
        finally:
            self.unlock(node)
        fit = min(count, (self.capacity_bytes - self._bytes) // per_position) if per_position else count
        if fit <= 0:
            return PrefixInsert(length, 0)
        leaf = Node(rows[length : length + fit].clone(), values.narrow(self.position_dim, 0, fit).clone(), node)
        leaf.last_used = next(self._clock)
        node.children[leaf.first] = leaf
        self._tokens += fit
        self._bytes += leaf.nbytes
        self._nodes += 1
        return PrefixInsert(length + fit, fit)

    def lock(self, node: Node) -> None:
        cursor: Node | None = node
        while cursor is not None:
            cursor.lock_ref += 1
            cursor = cursor.parent

    def unlock(self, node: Node) -> None:
        cursor: Node | None = node
        while cursor is not None:
            if cursor.lock_ref <= 0:
                raise RuntimeError("unlock() without a matching lock()")
            cursor.lock_ref -= 1
            cursor = cursor.parent

    def evict(self, nbytes: int) -> int:
        heap = [(n.last_used, id(n), n) for n in self._all() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < nbytes and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.first]
            freed += leaf.nbytes
            self._tokens -= len(leaf.key)
            self._bytes -= leaf.nbytes
            self._nodes -= 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self._evicted += freed
        return freed

    def stats(self) -> CacheStats:
        return CacheStats(
            self._hits, self._misses, self._reused, self._tokens, self._bytes, self._evicted, self._nodes
        )

    # ---- tree

    def _rows(self, key: Tensor) -> Tensor:
        # (W, T) prompt-shaped -> (T, W) int64 on the CPU, one row per position
        if key.dim() != 2:
            raise ValueError(f"key must be (W, T), got shape {tuple(key.shape)}")
        return key.detach().to("cpu", torch.long).t().contiguous()

    def _walk(self, rows: Tensor) -> tuple[Node, int, int]:
        """Follow ``rows`` down: (last node reached, positions matched, positions matched inside that node)."""
        node, pos, inside, tick = self.root, 0, 0, next(self._clock)
        while pos < len(rows):
            child = node.children.get(tuple(rows[pos].tolist()))
            if child is None:
                break
            n = _common_length(child.key, rows[pos:])
            child.last_used = tick
            node, pos, inside = child, pos + n, n
            if n < len(child.key):
                break
        return node, pos, inside if node is not self.root else 0

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node``'s run after ``n`` positions: a new parent takes the first n (and node's locks)."""
        assert node.parent is not None and node.value is not None and 0 < n < len(node.key)
        d, size = self.position_dim, len(node.key)
        head = Node(node.key[:n].clone(), node.value.narrow(d, 0, n).clone(), node.parent)
        head.lock_ref, head.last_used = node.lock_ref, node.last_used
        node.parent.children[head.first] = head
        node.key, node.value = node.key[n:].clone(), node.value.narrow(d, n, size - n).clone()
        node.first, node.parent = tuple(node.key[0].tolist()), head
        head.children[node.first] = node
        self._nodes += 1
        return head

    def _all(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _common_length(a: Tensor, b: Tensor) -> int:
    # a: (n, W), b: (m, W) -> length of their common prefix of rows
    k = min(len(a), len(b))
    differ = (a[:k] != b[:k]).any(dim=1).nonzero()
    return int(differ[0]) if len(differ) else k
