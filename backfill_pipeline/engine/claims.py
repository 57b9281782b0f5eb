"""Claims on the texts a stage is about to pay for, so runs working at once pay for each text once.

A stage claims its texts before sending them and drops each claim when its answer is cached (or the
request failed). A claim lasts ``seconds`` and is renewed while the stage works, so the claims of a run
that was killed lapse within that time. Another run that needs a claimed text waits for the answer to
appear in the cache and pays only if the claim lapses without one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from ..cache import ResultCache

log = logging.getLogger(__name__)


class Claims:
    def __init__(self, cache: ResultCache, seconds: float) -> None:
        self.cache, self.seconds = cache, seconds
        self.owner = uuid.uuid4().hex
        self.held: set[str] = set()

    async def take(self, keys: list[str]) -> set[str]:
        """Claim ``keys``; return those now held (the others are being paid for by another run)."""
        if not keys:
            return set()
        taken = await self.cache.claim(keys, self.owner, self.seconds)
        self.held |= taken
        return taken

    async def drop(self, keys: list[str]) -> None:
        mine = [k for k in keys if k in self.held]
        self.held.difference_update(mine)
        if mine:
            await self.cache.release(mine, self.owner)

    async def drop_all(self) -> None:
        await self.drop(sorted(self.held))

    async def keep_renewed(self) -> None:
        """Renew the claims held every third of their lifetime, until cancelled."""
        while True:
            await asyncio.sleep(self.seconds / 3)
            if self.held:
                try:
                    await self.cache.claim(sorted(self.held), self.owner, self.seconds)
                except Exception as exc:  # noqa: BLE001 - the next renewal tries again
                    log.warning(f"could not renew the claims on {len(self.held)} texts: {exc}")
