"""Paged KV memory: which blocks each sequence holds, with reference counts.

The pool itself (the tensors) lives in the model runner; this module only does the bookkeeping, so that the
scheduler can plan a step in pure Python. ``allocate`` returning ``None`` is the one way the engine learns that
memory ran out: the scheduler answers it by preempting a victim that a policy picks.
"""

from __future__ import annotations

from collections import deque

from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    """Fixed-size blocks with reference counts; a block returns to the free list when its count drops to 0."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, tail first, so that a sequence's tail is reused before its head."""
        for b in reversed(blocks):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)


class KVCacheManager:
    """Block tables of every sequence on the device pool, and of swapped-out sequences in CPU swap space."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.cpu_pool = BlockPool(num_cpu_blocks)
        self.tables: dict[str, list[int]] = {}
        self.cpu_tables: dict[str, list[int]] = {}
        # Copy-on-write copies (src, dst) the next forward pass must make before it writes; drained per step.
        self.pending_copies: list[tuple[int, int]] = []
        self._rewritten: set[str] = set()

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / max(self.pool.num_blocks, 1)

    def block_ids(self, req: Request) -> list[int]:
        return self.tables.get(req.request_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate(self, req: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for ``req``'s next ``num_new_tokens``; return the blocks appended, or None if the pool is short.

        A block this step writes into that another sequence still references is copied first (copy-on-write):
        the copy replaces it in this table and is queued in ``pending_copies``.
        """
        table = self.tables.get(req.request_id)
        if table is None:
            table = self.tables[req.request_id] = []
        computed = req.num_computed_tokens
        first_written = computed // self.block_size
        refs = self.pool.ref_counts
        shared = [i for i in range(first_written, len(table)) if refs[table[i]] > 1]
        num_new = max(-(-(computed + num_new_tokens) // self.block_size) - len(table), 0)
        if not num_new and not shared:
            return []  # the common decode step: the token fits the last block, which this sequence owns
        blocks = self.pool.allocate(num_new + len(shared))
        if blocks is None:
            return None
        for i, copy in zip(shared, blocks):
            self.pending_copies.append((table[i], copy))
            self.pool.release([table[i]])
            table[i] = copy
        if shared:
            self._rewritten.add(req.request_id)
        appended = blocks[len(shared):]
        table.extend(appended)
        return appended

    def take_rewritten(self, req: Request) -> bool:
        """Whether copy-on-write replaced entries of ``req``'s table since the last call (not only appended)."""
        if req.request_id in self._rewritten:
            self._rewritten.discard(req.request_id)
            return True
        return False

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` reference every block of ``parent``; writes into shared blocks copy them first."""
        table = list(self.tables[parent.request_id])
        self.pool.share(table)
        self.tables[child.request_id] = table

    def free(self, req: Request) -> None:
        self.pool.release(self.tables.pop(req.request_id, []))
        self.cpu_pool.release(self.cpu_tables.pop(req.request_id, []))
        self._rewritten.discard(req.request_id)

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Move ``req``'s whole table to CPU swap space: (device block, cpu block) pairs, or None if swap is full.

        Device blocks that other sequences share keep their contents; this sequence only drops its reference.
        """
        table = self.tables.get(req.request_id, [])
        cpu_blocks = self.cpu_pool.allocate(len(table))
        if cpu_blocks is None:
            return None
        self.pool.release(self.tables.pop(req.request_id, []))
        self.cpu_tables[req.request_id] = cpu_blocks
        return list(zip(table, cpu_blocks))

    def swap_in(self, req: Request) -> list[tuple[int, int]] | None:
        """Bring a swapped table back: (cpu block, device block) pairs, or None if the device pool is short."""
        cpu_blocks = self.cpu_tables[req.request_id]
        blocks = self.pool.allocate(len(cpu_blocks))
        if blocks is None:
            return None
        self.cpu_pool.release(self.cpu_tables.pop(req.request_id))
        self.tables[req.request_id] = blocks
        return list(zip(cpu_blocks, blocks))

    def check_invariants(self) -> None:
        """Every reference count equals the number of tables that hold the block; free blocks have none."""
        for pool, tables in ((self.pool, self.tables), (self.cpu_pool, self.cpu_tables)):
            counts = [0] * pool.num_blocks
            for table in tables.values():
                for b in table:
                    counts[b] += 1
            assert counts == pool.ref_counts, "reference counts disagree with the block tables"
            assert sorted(pool._free) == [b for b in range(pool.num_blocks) if counts[b] == 0], "free list is wrong"

    def all_free(self) -> bool:
        return (self.pool.num_free == self.pool.num_blocks and self.cpu_pool.num_free == self.cpu_pool.num_blocks
                and not self.tables and not self.cpu_tables)
