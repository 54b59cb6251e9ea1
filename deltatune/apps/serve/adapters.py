"""Which adapters are in memory: an LRU cache with just-in-time loading, as LoRAX does.

A request may name any adapter folder under the adapter root (or one named at start or loaded by an admin): the
first request for it loads it, later ones find it in memory. At most `max_adapters` are held; making room evicts the
least recently used adapter that no request is using. Reading an adapter's files happens on a loader thread; the
model thread only attaches the tensors, between two decoding steps. Everything here runs on the event loop, so the
bookkeeping needs no locks.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import OrderedDict, defaultdict
from concurrent.futures import Executor
from typing import Any

from fastapi import HTTPException

from deltatune.apps.serve.batching import Engine, PreparedAdapter, Scheduler
from deltatune.errors import AdapterNotFoundError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_under_root(root: str, path: str) -> str:
    """The real folder `path` names, refused unless it (and its adapter files) lie inside `root` after resolving
    `..` and symlinks; relative paths are taken from `root`. Messages never show the server's own paths."""
    real_root = os.path.realpath(root)
    if "\x00" in path:
        raise HTTPException(400, "Adapter path contains a NUL character.")
    real = os.path.realpath(os.path.join(real_root, path))
    candidates = [real] + [os.path.realpath(os.path.join(real, f)) for f in ADAPTER_FILES]
    for candidate in candidates:
        if os.path.commonpath([candidate, real_root]) != real_root:
            raise HTTPException(
                403,
                f"Adapter path {path!r} is outside the allowed root (--adapter-root); copy the adapter there.",
            )
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(real, f))]
    if missing:
        raise HTTPException(
            400,
            f"{path!r} is not an adapter folder: missing {', '.join(missing)} (only safetensors are loaded).",
        )
    return real


class AdapterCache:
    """Loaded adapters in least-recently-used order, with per-adapter request counts (an adapter in use is never
    evicted) and the loads in progress (a second request for the same adapter waits for the first load)."""

    def __init__(
        self, engine: Engine, scheduler: Scheduler, root: str, max_adapters: int, loader: Executor
    ) -> None:
        if len(engine.paths) > max_adapters:
            raise ValueError(
                f"{len(engine.paths)} adapters were named at start but --max-adapters is {max_adapters}."
            )
        self.engine, self.scheduler, self.root = engine, scheduler, root
        self.max_adapters, self.loader = max_adapters, loader
        self.known: dict[str, str] = dict(engine.paths)  # named at start or by an admin: name -> folder
        self.loaded: OrderedDict[str, None] = OrderedDict.fromkeys(engine.paths)
        self.refs: dict[str, int] = defaultdict(int)
        self.loading: dict[str, asyncio.Task] = {}
        self.draining: dict[str, asyncio.Event] = {}  # being unloaded -> set when done
        self.reserved = 0  # slots promised to loads in progress

    def names(self) -> list[str]:
        """The adapters in memory, by name."""
        return sorted(n for n in self.loaded if n not in self.draining)

    def path(self, name: str) -> str:
        """The folder an adapter comes from: the one it was named with, else `<root>/<name>`."""
        if name in self.known:
            return self.known[name]
        if not NAME_PATTERN.match(name):
            raise AdapterNotFoundError(f"No adapter named {name!r}: {self._available()}.")
        try:
            return resolve_under_root(self.root, name)
        except HTTPException:
            raise AdapterNotFoundError(
                f"No adapter named {name!r} is loaded or found under the adapter root; {self._available()}."
            ) from None

    def _available(self) -> str:
        loaded = ", ".join(self.names()) or "none"
        return f"loaded: {loaded} (or the base model)"

    async def acquire(self, name: str | None) -> None:
        """Make sure `name` is in memory and count one more request using it (None: the base, always there)."""
        if name is None:
            return
        while True:
            if name in self.draining:  # an admin is unloading it: wait, then load it again if it can be found
                await self.draining[name].wait()
                continue
            if name in self.loaded:
                self.loaded.move_to_end(name)
                self.refs[name] += 1
                return
            if name not in self.loading:
                self._start_load(name, self.path(name))
            await asyncio.shield(self.loading[name])  # a request that gives up does not stop the load

    def hold(self, name: str | None) -> None:
        """One more holder of an adapter already acquired (a stream that outlives its request handler)."""
        if name is not None:
            self.refs[name] += 1

    def release(self, name: str | None) -> None:
        if name is not None:
            self.refs[name] -= 1

    async def load(self, name: str, path: str) -> None:
        """An admin's load of folder `path` (already checked to lie under the root) under `name`."""
        if name in self.loaded or name in self.loading or name in self.draining:
            raise HTTPException(
                409, f"An adapter named {name!r} is already loaded or loading; DELETE it first."
            )
        self.known[name] = path
        try:
            await asyncio.shield(self._start_load(name, path))
        except BaseException:
            if name not in self.loaded:
                self.known.pop(name, None)
            raise

    def _start_load(self, name: str, path: str) -> asyncio.Task:
        """Load `name` in a task of its own (every request asking for it meanwhile waits for the same task)."""
        task = asyncio.ensure_future(self._load(name, path))
        self.loading[name] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures reach the waiters only
        return task

    async def _load(self, name: str, path: str) -> None:
        """Read the files on the loader thread, make room, attach on the model thread (between two steps)."""
        try:
            read = self.engine.read_adapter  # Engine's, or RecommendEngine's for rec runs
            adapter = await asyncio.get_running_loop().run_in_executor(self.loader, read, path)
            victims = self._make_room()
            self.reserved += 1
            try:
                await asyncio.wrap_future(self.scheduler.call(self._swap, victims, name, adapter, path))
            finally:
                self.reserved -= 1
            self.loaded[name] = None
        finally:
            del self.loading[name]

    def _make_room(self) -> list[str]:
        """Take the least recently used idle adapters out of the cache (the model thread drops them next)."""
        excess = len(self.loaded) + self.reserved + 1 - self.max_adapters
        victims = [n for n in self.loaded if self.refs[n] <= 0 and n not in self.draining][: max(0, excess)]
        if len(victims) < excess:
            raise HTTPException(
                503,
                f"All {self.max_adapters} adapter slots (--max-adapters) are in use by running requests; retry soon.",
                headers={"Retry-After": "1"},
            )
        for name in victims:
            del self.loaded[name]
        return victims

    def _swap(self, victims: list[str], name: str, adapter: PreparedAdapter | Any, path: str) -> None:
        for victim in victims:  # model thread
            self.engine.unload(victim)
        self.engine.install(name, adapter, path)

    async def unload(self, name: str) -> None:
        """An admin's unload: wait for the requests using it, then drop it (and forget where it came from)."""
        if name in self.draining or (name not in self.loaded and name not in self.known):
            raise AdapterNotFoundError(f"No adapter named {name!r}.")
        self.draining[name] = asyncio.Event()
        try:
            while self.refs[name] > 0 or name in self.loading:
                await asyncio.sleep(0.005)
            if name in self.loaded:
                await asyncio.wrap_future(self.scheduler.call(self.engine.unload, name))
                del self.loaded[name]
            self.known.pop(name, None)
        finally:
            self.draining.pop(name).set()
