"""Admission of uploads, before their bodies are read: each is received to the scratch disk, so
how many run at once (per user, and in all) bounds the disk they can take, and one tenant's
uploads cannot take every slot. Beyond either bound: 429 at once, nothing received."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import RateLimitError
from gateway.fair_share import UserLimiter

RETRY_AFTER_S = 5.0


class UploadAdmission:
    def __init__(self, per_user: int, total: int) -> None:
        self._per_user = UserLimiter(per_user, max_queued=0, queue_timeout_s=RETRY_AFTER_S)
        self._total = total
        self._receiving = 0

    @asynccontextmanager
    async def admit(self, user: str) -> AsyncIterator[None]:
        if self._receiving >= self._total:
            raise RateLimitError(
                f"The gateway is receiving {self._total} uploads already. Retry shortly.", retry_after_s=RETRY_AFTER_S
            )
        async with self._per_user.admit(user):  # RateLimitError when the user has theirs running
            self._receiving += 1
            try:
                yield
            finally:
                self._receiving -= 1
