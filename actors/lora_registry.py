"""Which LoRA adapters the service serves, and how every worker replica comes to hold them (docs/lora.md).

``LoRARegistry`` lives in the scheduler (one replica): the adapters requests may name, each as a ``LoRARef`` whose
``uid`` is new on every load. Its ``version`` grows on every change; a change reaches the workers as a whole
``snapshot`` (version + adapters), broadcast when it is made and repeated in heartbeat replies to any worker
reporting an older version, so that a replica started later, or one that missed a broadcast, catches up.

``WorkerAdapters`` lives in each worker: it makes the worker's engine hold what the latest snapshot names
(``sync``), and also any load a request was admitted with (``acquire``). The second matters in two races: a
request admitted just before its adapter was unloaded (it is served by that load: "unloading waits for the
requests using it"), and one routed to a replica that has not heard of a new load yet. Engine-side, a
runtime load is registered under its uid rather than its name, so two loads of one name (unload, then load
another directory under that name) can serve their own requests side by side while the old one drains.

Loading is validated by the workers themselves (they read the files): ``propose`` gives the snapshot with the new
adapter, the scheduler broadcasts it, and then either ``commit``s it (every worker loaded it) or ``abandon``s it
(a later version without it, so the workers that did load it drop it again).

After a restart of the scheduler, the registry is rebuilt from the workers: each heartbeat carries the worker's
snapshot, and until the registry makes a change of its own it ``adopt``s the newest one reported (its adapters,
under their uids, and its version, so that later changes reach the workers as newer). Uids carry a random
*epoch* drawn by each registry (``name#<epoch>.<n>``), so that a load made after a restart can never take the
uid of an older load still resident on some worker (its engine would then serve the old weights under it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2serve.actors.protocol import LoRARef
from gpt2serve.engine.async_llm import AsyncLLM
from gpt2serve.engine.config import LoRAModuleConfig
from gpt2serve.engine.lora import LoRAError, UnknownLoRAError, startup_uid

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoRASnapshot:
    version: int
    adapters: dict[str, LoRARef] = field(default_factory=dict)  # name -> load


def allowed_adapter_dir(path: str, roots: list[Path]) -> str:
    """``path`` with its symbolic links resolved, if that is a directory under one of ``roots`` (resolved
    already); else LoRAError, with one message whether the path is missing or outside the roots, so that a
    client cannot probe which paths exist. The resolved path is what the workers read, so a link changed after
    this check changes nothing."""
    try:
        real = Path(path).resolve(strict=True)
        allowed = real.is_dir() and any(real == root or root in real.parents for root in roots)
    except (OSError, RuntimeError, ValueError):  # missing, a loop of links, a NUL byte
        allowed = False
    if not allowed:
        raise LoRAError(f"LoRA adapter path {path!r} is not an adapter directory this service may load "
                        "(lora_allowed_roots)")
    return str(real)


class LoRARegistry:
    def __init__(self, modules: list[LoRAModuleConfig], reserved_names: set[str]):
        # Start-up adapters: every worker's engine loaded them from the same config, under the same uids.
        self.adapters = {m.name: LoRARef(m.name, startup_uid(m.name), m.path) for m in modules if not m.merge}
        self.merged = next((m.name for m in modules if m.merge), None)  # folded into the base weights
        self.reserved = set(reserved_names)  # the base model's names
        self.version = 0
        self.epoch = secrets.token_hex(4)  # new in every scheduler process: see the module docstring
        self._uids = itertools.count(1)
        self._proposed: LoRARef | None = None
        self._changed = False  # a change of its own made: no more adopting what workers report

    def resolve(self, name: str) -> LoRARef | None:
        """The load a request naming ``name`` gets; None for the base model (and for the merged adapter, which
        is the base model now). UnknownLoRAError if nothing by that name is served."""
        if name in self.reserved or name == self.merged:
            return None
        ref = self.adapters.get(name)
        if ref is None:
            raise UnknownLoRAError(f"The model `{name}` does not exist.")
        return ref

    def snapshot(self) -> LoRASnapshot:
        return LoRASnapshot(self.version, dict(self.adapters))

    def propose(self, name: str, path: str) -> LoRASnapshot:
        """The snapshot with ``name`` loaded from ``path``, for the workers to try (LoRAError: name taken)."""
        assert self._proposed is None, "one change at a time (the scheduler holds a lock)"
        if name in self.reserved or name == self.merged or name in self.adapters:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        self._changed = True
        self._proposed = LoRARef(name, f"{name}#{self.epoch}.{next(self._uids)}", path)
        return LoRASnapshot(self.version + 1, {**self.adapters, name: self._proposed})

    def commit(self) -> LoRARef:
        ref, self._proposed = self._proposed, None
        self.adapters[ref.name] = ref
        self.version += 1
        return ref

    def abandon(self) -> LoRASnapshot:
        """Back to the adapters before the proposal, at a version after it."""
        self._proposed = None
        self.version += 2
        return self.snapshot()

    def remove(self, name: str) -> LoRASnapshot:
        if name == self.merged:
            raise LoRAError(f"The lora adapter '{name}' is merged into the base weights and cannot be unloaded.")
        if self.adapters.pop(name, None) is None:
            raise UnknownLoRAError(f"The lora adapter '{name}' cannot be found.")
        self._changed = True
        self.version += 1
        return self.snapshot()

    def adopt(self, version: int, adapters: list[LoRARef] | None) -> None:
        """A worker's snapshot, from its heartbeat. Newer than this registry's: the registry was restarted and
        rebuilds itself from it (adapters and version), unless it already made a change of its own; then it only
        moves its version past the worker's, so that the worker's next heartbeat reply brings it this registry's
        adapters (a worker ignores snapshots older than its own)."""
        if version <= self.version or adapters is None:
            return
        if self._changed:
            self.version = version + 1
            return
        self.adapters = {ref.name: LoRARef(*ref) for ref in adapters}
        self.version = version


class WorkerAdapters:
    """A worker's side of the registry: its engine's adapters, as this (event-loop) side has asked for them.

    ``held`` maps each load's uid to its name in the engine, and is changed here, synchronously, when a change
    is decided; the engine applies it between two steps. A load is dropped only when the latest snapshot lacks it
    and no request of this worker holds it (``users``: from ``acquire`` until the request ends), so a request
    never reaches ``generate`` with an adapter that is on its way out.
    """

    def __init__(self, llm: AsyncLLM):
        self.llm = llm
        self.held: dict[str, str] = {uid: name for name, uid in llm.engine.lora_names.items()}  # start-up ones
        self.users: Counter[str] = Counter()
        self.wanted = LoRASnapshot(0, {ref.name: ref for ref in
                                       (LoRARef(name, uid, "") for uid, name in self.held.items())})
        self._lock = asyncio.Lock()  # one change at a time: adds wait for file reads

    @property
    def version(self) -> int:
        return self.wanted.version

    async def acquire(self, ref: LoRARef) -> str:
        """Hold ``ref`` for one request and return the name to give the engine (LoRAError if it cannot load).
        Pair with ``release``."""
        self.users[ref.uid] += 1
        try:
            async with self._lock:
                await self._load(ref)
        except BaseException:
            self.release(ref)
            raise
        return self.held[ref.uid]

    def release(self, ref: LoRARef) -> None:
        self.users[ref.uid] -= 1
        if not self.users[ref.uid]:
            del self.users[ref.uid]

    async def sync(self, snapshot: LoRASnapshot) -> dict[str, str]:
        """Make the engine hold what ``snapshot`` names (older snapshots than the last one are ignored), drop
        what it no longer names; returns {adapter name: why it could not be loaded}."""
        async with self._lock:
            if snapshot.version > self.wanted.version:
                self.wanted = snapshot
            errors = {}
            for ref in self.wanted.adapters.values():
                try:
                    await self._load(ref)
                except LoRAError as e:
                    log.warning("LoRA adapter %r (%s) could not be loaded: %s", ref.name, ref.path, e)
                    errors[ref.name] = str(e)
            await self._drop_unwanted()
            return errors

    def has_unwanted(self) -> bool:
        return bool(self._unwanted())

    async def sweep(self) -> None:
        """Drop loads that requests held past the snapshot that unloaded them."""
        async with self._lock:
            await self._drop_unwanted()

    def _unwanted(self) -> list[str]:
        wanted = {ref.uid for ref in self.wanted.adapters.values()}
        return [uid for uid in self.held if uid not in wanted and not self.users[uid]]

    async def _drop_unwanted(self) -> None:
        for uid in self._unwanted():
            if self.users[uid]:  # acquired while an earlier removal was awaited
                continue
            # Requests already running with it finish with it: the engine drops it after the last one.
            await self.llm.remove_lora(self.held.pop(uid))

    async def _load(self, ref: LoRARef) -> None:
        if ref.uid not in self.held:
            await self.llm.add_lora(ref.uid, ref.path, ref.uid)
            self.held[ref.uid] = ref.uid

    def info(self) -> dict[str, Any]:
        return {"lora_version": self.version, "lora_held": sorted(self.held)}

    def report(self) -> dict[str, Any]:
        """The heartbeat's part: the snapshot this worker follows, from which a restarted scheduler rebuilds its
        registry (``LoRARegistry.adopt``)."""
        return {"lora_version": self.version, "lora_adapters": list(self.wanted.adapters.values())}
