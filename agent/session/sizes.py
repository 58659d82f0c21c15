"""What deleting a checkpoint would free: the bytes it reaches that no other ref
of any studio in the work directory reaches (clones share their source's).

Every ref of every studio is read and every manifest they reach followed once
(``reach.py``); a blob reached by exactly one ref is that ref's to free.  A ref
or manifest that cannot be read counts as reaching nothing, so what it shares
shows as freed: the figure is an upper bound, as gc itself keeps anything in
doubt.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from agent.checkpoint.manifest import EMPTY_DIGEST
from agent.errors import AgentError
from agent.session.reach import ManifestReader
from agent.store.base import RefValue, Store

CONCURRENCY = 16


class Sizes:
    def __init__(self, store: Store, scratch: Path) -> None:
        self._store = store
        self._reader = ManifestReader(store, scratch)
        self._nodes: dict[str, tuple[int, list[tuple[str, int, bool]]]] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def _node(self, digest: str) -> tuple[int, list[tuple[str, int, bool]]]:
        if digest not in self._nodes:
            try:
                async with self._limit:
                    size, kids = await self._reader.read(digest)
                self._nodes[digest] = (size, [(k.digest, k.size, k.manifest) for k in kids])
            except AgentError:
                self._nodes[digest] = (0, [])
        return self._nodes[digest]

    async def reach(self, digest: str) -> dict[str, int]:
        """Every blob a manifest reaches, itself included, with its size."""
        out: dict[str, int] = {}
        stack = [digest]
        while stack:
            d = stack.pop()
            size, kids = await self._node(d)
            out[d] = size
            for kid, kid_size, manifest in kids:
                if kid == EMPTY_DIGEST:
                    continue  # the empty config: named by every manifest, stored by none
                if manifest:
                    if kid not in out:
                        stack.append(kid)
                else:
                    out[kid] = kid_size
        return out

    async def frees(self, studio: str, own: dict[str, str]) -> dict[str, int]:
        """For each of ``studio``'s refs (name -> manifest), the bytes only it reaches."""
        counts: Counter[str] = Counter()
        mine: dict[str, dict[str, int]] = {}

        async def count_studio(s: str) -> None:
            refs = own if s == studio else {n: r.digest for n, r in (await self._list(s)).items()}
            for name, digest in refs.items():
                reached = await self.reach(digest)
                counts.update(reached.keys())
                if s == studio:
                    mine[name] = reached

        studios = set(await self._store.list_studios()) | {studio}
        await asyncio.gather(*(count_studio(s) for s in studios))
        return {
            name: sum(size for d, size in reached.items() if counts[d] == 1)
            for name, reached in mine.items()
        }

    async def _list(self, studio: str) -> dict[str, RefValue]:
        async with self._limit:
            return await self._store.list_refs(studio)
