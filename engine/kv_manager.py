"""Paged KV memory: which blocks each sequence holds, with reference counts, and the prefix cache over them.

The pool itself (the tensors) lives in the model runner; this module only does the bookkeeping, so that the
scheduler can plan a step in pure Python. ``allocate`` returning ``None`` is the one way the engine learns that
memory ran out: the scheduler answers it by preempting a victim that a policy picks.

Prefix caching (automatic, as in vLLM): once a full block's K/V are computed, the block is registered under the
chained hash of its tokens (``engine.prefix_cache``). A new request starts from the longest run of its leading
blocks found there, sharing them by reference count instead of recomputing them. A block nobody references any
more stays cached, in the free queue, until it is handed out again: the free queue is the eviction order. Blocks
that cache nothing sit at its front (reusing them loses nothing); cached ones follow in the order they were freed,
least recently used first, and a sequence frees its tail before its head, so a shared head outlives the tails
that hang off it. A cached block is never written again: a request that must write into one (its whole prompt was
cached and its last token is computed again for the logits, or a forked sample) copies it first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from gpt2serve.engine.prefix_cache import ROOT_HASH, block_hashes, extra_keys_bytes, token_bytes
from gpt2serve.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


BlockKey = tuple[int, bytes, bytes]  # (parent hash, token ids as bytes, extra keys): what a hit must match


class BlockPool:
    """Fixed-size blocks with reference counts, a free queue in eviction order, and the hash → block index."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        # (hash, stored?) in order, for the worker to publish to the router. A deque: the worker drains it from
        # the event loop's thread while the step thread appends, and append / popleft are each atomic.
        self.events: deque[tuple[int, bool]] = deque()
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if self.block_hash[b] is not None:
                self._evict(b)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        del self.cached[h]
        self.block_hash[b] = self.block_key[b] = None
        self.events.append((h, False))
        self.num_evictions += 1

    def share(self, blocks: list[int]) -> None:
        """Add a reference to each block; a cached block nobody referenced comes back out of the free queue."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                assert self.block_hash[b] is not None, f"sharing free block {b}, which caches nothing"
                del self._free[b]
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, tail first, so that a sequence's tail is evicted before its head."""
        for b in reversed(blocks):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    # ------------------------------------------------------------------ the hash index
    def cache(self, b: int, h: int, key: BlockKey) -> None:
        """Register block ``b``'s computed contents under ``h``, unless another block already holds that hash."""
        if self.block_hash[b] is None and h not in self.cached:
            self.block_hash[b], self.block_key[b] = h, key
            self.cached[h] = b
            self.events.append((h, True))

    def lookup(self, h: int, key: BlockKey) -> int | None:
        b = self.cached.get(h)
        # The collision guard: a 64-bit hash could collide; the tokens, the parent and the extra keys cannot.
        return b if b is not None and self.block_key[b] == key else None


@dataclass
class PrefixHit:
    """The cached blocks a request can start from, and how many of its tokens they save."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class KVCacheManager:
    """Block tables of every sequence on the device pool, and of swapped-out sequences in CPU swap space."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.cpu_pool = BlockPool(num_cpu_blocks)
        self.tables: dict[str, list[int]] = {}
        self.cpu_tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # per sequence: leading blocks of its table already cached
        # Copy-on-write copies (src, dst) the next forward pass must make before it writes; drained per step.
        self.pending_copies: list[tuple[int, int]] = []
        self._rewritten: set[str] = set()
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache, at admission
        self.num_hit_tokens = 0  # of those, the ones found cached (not computed)

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / max(self.pool.num_blocks, 1)

    def block_ids(self, req: Request) -> list[int]:
        return self.tables.get(req.request_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """``req``'s first ``num_blocks`` block hashes, computed once per request and extended as it grows."""
        if len(req.block_hashes) < num_blocks:
            tokens = req.all_token_ids[:num_blocks * self.block_size]
            req.block_hashes = block_hashes(tokens, self.block_size, req.cache_extra_keys, known=req.block_hashes)
        return req.block_hashes

    def _keys(self, req: Request, first: int, end: int) -> list[BlockKey]:
        """The collision-guard keys of ``req``'s blocks ``first .. end - 1`` (their hashes must be known)."""
        bs = self.block_size
        tokens = req.prompt_token_ids if end * bs <= req.num_prompt_tokens else req.all_token_ids
        data, step = token_bytes(tokens[first * bs:end * bs]), 8 * bs
        extra = extra_keys_bytes(req.cache_extra_keys)
        parents = [ROOT_HASH] + req.block_hashes[:end - 1] if first == 0 else req.block_hashes[first - 1:end - 1]
        return [(parents[j], data[j * step:(j + 1) * step], extra) for j in range(end - first)]

    def match_prefix(self, req: Request, max_blocks: int | None = None) -> PrefixHit:
        """The longest run of ``req``'s leading full blocks that is cached. Looks only; changes nothing.

        A request that starts from scratch still computes at least its last token, which yields the logits of
        its next one; prompt logprobs need every prompt position's hidden state, so such requests do not look.
        """
        if (not self.enable_prefix_caching or req.request_id in self.tables
                or req.params.prompt_logprobs is not None):
            return PrefixHit()
        limit = req.num_tokens // self.block_size if max_blocks is None else max_blocks
        hashes = self._hashes(req, limit)
        cached = self.pool.cached
        run = 0
        while run < limit and hashes[run] in cached:  # dict probes first; keys only for what may be a hit
            run += 1
        blocks = []
        for h, key in zip(hashes[:run], self._keys(req, 0, run) if run else ()):
            b = self.pool.lookup(h, key)
            if b is None:
                break
            blocks.append(b)
        return PrefixHit(blocks, min(len(blocks) * self.block_size, req.num_tokens - 1))

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks of ``req`` that its computed tokens have filled since the last call."""
        table = self.tables.get(req.request_id)
        if not self.enable_prefix_caching or table is None:
            return
        done = self._num_registered.get(req.request_id, 0)
        full = min(req.num_computed_tokens // self.block_size, len(table))
        if full <= done:
            return
        hashes = self._hashes(req, full)
        for i, key in zip(range(done, full), self._keys(req, done, full)):
            self.pool.cache(table[i], hashes[i], key)
        self._num_registered[req.request_id] = full

    def drain_cache_events(self) -> list[tuple[int, bool]]:
        """(block hash, True) for each block cached and (hash, False) for each evicted since the last call.

        Safe to call from another thread than the one stepping the engine: events appended meanwhile stay for
        the next call.
        """
        events = self.pool.events
        return [events.popleft() for _ in range(len(events))]

    # ------------------------------------------------------------------ allocation
    def allocate(self, req: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> list[int] | None:
        """Make room for ``req``'s next ``num_new_tokens``; return the blocks appended, or None if the pool is short.

        ``hit`` (from ``match_prefix``, for a request without a table yet) is where it starts: its blocks become
        the head of the table, and ``num_new_tokens`` count from ``hit.num_tokens``. The caller then advances the
        request's ``num_computed_tokens`` to ``hit.num_tokens``. On None nothing has changed.

        A block this step writes into that another sequence still references, or that the prefix cache holds,
        is copied first (copy-on-write): the copy replaces it in this table and is queued in ``pending_copies``.
        """
        rid = req.request_id
        if hit is not None:
            assert rid not in self.tables and req.num_computed_tokens == 0
            computed = hit.num_tokens
            # Feasible only if the revived hits plus the new blocks and one copy fit what is free now.
            revived = sum(1 for b in hit.blocks if self.pool.ref_counts[b] == 0)
            copies = max(len(hit.blocks) - computed // self.block_size, 0)  # cached blocks it writes into
            new = max(cdiv(computed + num_new_tokens, self.block_size) - len(hit.blocks), 0)
            if revived + copies + new > self.pool.num_free:
                return None
            self.pool.share(hit.blocks)
            self.tables[rid] = list(hit.blocks)
            self._num_registered[rid] = len(hit.blocks)
            if self.enable_prefix_caching:
                self.num_queried_tokens += req.num_tokens
                self.num_hit_tokens += hit.num_tokens
        else:
            computed = req.num_computed_tokens
        table = self.tables.get(rid)
        if table is None:
            table = self.tables[rid] = []
        first_written = computed // self.block_size
        refs, hashed = self.pool.ref_counts, self.pool.block_hash
        if (first_written == len(table) - 1 and computed + num_new_tokens <= len(table) * self.block_size
                and refs[table[-1]] == 1 and hashed[table[-1]] is None):
            return []  # the common decode step: the token fits the last block, which this sequence owns alone
        shared = [i for i in range(first_written, len(table)) if refs[table[i]] > 1 or hashed[table[i]] is not None]
        num_new = max(cdiv(computed + num_new_tokens, self.block_size) - len(table), 0)
        if not num_new and not shared:
            return []
        blocks = self.pool.allocate(num_new + len(shared))
        if blocks is None:
            return None
        for i, copy in zip(shared, blocks):
            self.pending_copies.append((table[i], copy))
            self.pool.release([table[i]])
            table[i] = copy
        if shared:
            self._rewritten.add(rid)
        appended = blocks[len(shared):]
        table.extend(appended)
        return appended

    def trim(self, req: Request) -> None:
        """Free the tail blocks past ``req``'s computed tokens: after a verify step, those held only rejected
        proposals (their K/V are garbage; the next step allocates again what it needs)."""
        table = self.tables.get(req.request_id)
        keep = self.blocks_for(req.num_computed_tokens)
        if table is not None and len(table) > keep:
            self.pool.release(table[keep:])
            del table[keep:]
            self._rewritten.add(req.request_id)  # the runner's copy of the table must be replaced, not appended to

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
        self._num_registered[child.request_id] = self._num_registered.get(parent.request_id, 0)
        child.block_hashes = list(parent.block_hashes[:child.num_tokens // self.block_size])

    def free(self, req: Request) -> None:
        self.pool.release(self.tables.pop(req.request_id, []))
        self.cpu_pool.release(self.cpu_tables.pop(req.request_id, []))
        self._num_registered.pop(req.request_id, None)
        self._rewritten.discard(req.request_id)

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Move ``req``'s whole table to CPU swap space: (device block, cpu block) pairs, or None if swap is full.

        Device blocks that other sequences share keep their contents; this sequence only drops its reference
        (a cached block it drops stays cached, for others or for its own return).
        """
        table = self.tables.get(req.request_id, [])
        cpu_blocks = self.cpu_pool.allocate(len(table))
        if cpu_blocks is None:
            return None
        self.pool.release(self.tables.pop(req.request_id, []))
        self._num_registered.pop(req.request_id, None)
        self.cpu_tables[req.request_id] = cpu_blocks
        return list(zip(table, cpu_blocks))

    def swap_in(self, req: Request) -> list[tuple[int, int]] | None:
        """Bring a swapped table back: (cpu block, device block) pairs, or None if the device pool is short.

        Leading full blocks still in the prefix cache are shared again instead of copied back.
        """
        cpu_blocks = self.cpu_tables[req.request_id]
        hit = self.match_prefix(req, max_blocks=min(req.num_computed_tokens // self.block_size, len(cpu_blocks)))
        revived = sum(1 for b in hit.blocks if self.pool.ref_counts[b] == 0)
        if revived + len(cpu_blocks) - len(hit.blocks) > self.pool.num_free:
            return None
        self.pool.share(hit.blocks)
        blocks = self.pool.allocate(len(cpu_blocks) - len(hit.blocks))
        assert blocks is not None
        self.cpu_pool.release(self.cpu_tables.pop(req.request_id))
        self.tables[req.request_id] = hit.blocks + blocks
        self._num_registered[req.request_id] = len(hit.blocks)
        return list(zip(cpu_blocks[len(hit.blocks):], blocks))

    # ------------------------------------------------------------------ checks and stats
    def check_invariants(self) -> None:
        """Every reference count equals the number of tables that hold the block; free blocks have none; the
        hash index and the blocks agree, and only full, registered blocks carry a hash."""
        for pool, tables in ((self.pool, self.tables), (self.cpu_pool, self.cpu_tables)):
            counts = [0] * pool.num_blocks
            for table in tables.values():
                for b in table:
                    counts[b] += 1
            assert counts == pool.ref_counts, "reference counts disagree with the block tables"
            assert sorted(pool._free) == [b for b in range(pool.num_blocks) if counts[b] == 0], "free list is wrong"
            assert all(pool.block_hash[b] == h for h, b in pool.cached.items()), "hash index points at wrong blocks"
            assert sum(h is not None for h in pool.block_hash) == len(pool.cached), "a hashed block is not indexed"

    def all_free(self) -> bool:
        """No sequence holds a block: each one is free, cached or not, with no reference."""
        return (self.pool.num_free == self.pool.num_blocks and self.cpu_pool.num_free == self.cpu_pool.num_blocks
                and not self.tables and not self.cpu_tables and not any(self.pool.ref_counts))

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_queries": self.num_queried_tokens, "prefix_cache_hits": self.num_hit_tokens,
                "prefix_cache_evictions": self.pool.num_evictions, "num_cached_blocks": len(self.pool.cached)}
