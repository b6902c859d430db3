"""How fast a queue serves its waiters while it has any: what a newcomer's wait is estimated from.

The clock runs only while someone waits. A rate measured over wall time would count the idle minutes
before a burst as slowness, and refuse requests the queue could serve at once.
"""

from __future__ import annotations

import math
import time
from collections import deque

SAMPLES = 32  # the newest grants the rate is measured over
MIN_SAMPLES = 8  # fewer: no estimate (nothing is refused early)
MAX_RETRY_AFTER_S = 60


def retry_after_s(wait_s: float) -> int:
    """A refused request's Retry-After: the estimated wait in whole seconds, 1 to a minute."""
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait_s)))


class ServiceRate:
    def __init__(self, samples: int = SAMPLES, min_samples: int = MIN_SAMPLES) -> None:
        self._min_samples = min_samples
        self._served_at: deque[float] = deque(maxlen=samples)  # the busy clock at each grant
        self._busy_s = 0.0  # seconds with someone waiting, up to `_busy_since`
        self._busy_since: float | None = None  # time.monotonic() when the queue last became non-empty

    def queue_changed(self, waiting: int) -> None:
        """Call whenever the queue's length changes: the busy clock runs while it is above 0."""
        now = time.monotonic()
        if self._busy_since is not None:
            self._busy_s += now - self._busy_since
        self._busy_since = now if waiting > 0 else None

    def served(self) -> None:
        """A waiter left the queue with what it waited for."""
        self._served_at.append(self._busy_clock())

    def per_second(self) -> float | None:
        """Waiters served per busy second lately; None until enough were."""
        if len(self._served_at) < self._min_samples:
            return None
        span = self._served_at[-1] - self._served_at[0]
        return (len(self._served_at) - 1) / span if span > 0 else math.inf

    def wait_s(self, ahead: int) -> float | None:
        """The estimated wait of a newcomer with `ahead` waiters before it; None: no estimate yet."""
        rate = self.per_second()
        return None if rate is None else (ahead + 1) / rate

    def _busy_clock(self) -> float:
        running = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
        return self._busy_s + running
