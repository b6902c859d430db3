"""Router: which of a caller's adapters answers a `model: "auto"` request.

The prompt is embedded off the event loop (one encoder thread) and scored against each candidate's
route examples; candidates are chosen by the caller (only adapters it may use). Route embeddings
are computed once per record version and kept (bounded): a background pass embeds every synced
record's routes, so a request pays for its prompt only, whoever asked before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from adapters_manifest.record import AdapterRecord
from gateway.errors import ServiceUnavailableError
from gateway.metrics import GatewayMetrics, detached_metrics, elapsed_since
from gateway.routing.encoder import SentenceEncoder
from gateway.routing.matcher import Decision, decide
from gateway.telemetry import spans

log = logging.getLogger(__name__)

MAX_CACHED_RECORDS = 4096  # route embeddings of at most this many record versions (LRU)
WARM_BATCH = 64  # route texts per encoder call of the background pass: requests interleave


def route_texts(record: AdapterRecord) -> tuple[str, ...]:
    """What an adapter is matched by: its route examples, and its description beside them. An
    adapter without routes is never routed to (a description alone is too vague to route by)."""
    if not record.routes:
        return ()
    return (*record.routes, record.description) if record.description else tuple(record.routes)


@dataclass(frozen=True)
class RouteChoice:
    record: AdapterRecord | None  # None: the base model answers
    decision: Decision


class Router:
    def __init__(
        self,
        load_encoder: Callable[[], SentenceEncoder],
        threshold: float,
        tracer: Tracer | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._load_encoder = load_encoder
        self.threshold = threshold
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or detached_metrics()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="route-encoder")
        self._encoder: asyncio.Future[SentenceEncoder] | None = None
        self._routes: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = OrderedDict()

    def start(self) -> None:
        """Load the encoder in its thread; requests wait for it (a failure: routing answers 503)."""
        if self._encoder is None:
            self._encoder = asyncio.wrap_future(self._thread.submit(self._loaded))

    def _loaded(self) -> SentenceEncoder:
        started = time.perf_counter()
        try:
            encoder = self._load_encoder()
        except Exception:
            log.exception("routing: the sentence encoder failed to load; model 'auto' answers 503")
            raise
        log.info("routing: sentence encoder loaded in %.1f s", elapsed_since(started))
        return encoder

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def choose(self, text: str, candidates: Sequence[AdapterRecord]) -> RouteChoice:
        """The candidate whose routes best match `text`, if it reaches the threshold; else the base."""
        started = time.perf_counter()
        with self._tracer.start_as_current_span(spans.ROUTE) as span:
            routed = [r for r in candidates if route_texts(r)]
            decision = Decision(None, {})
            if routed:  # nothing to compare with: the base, without embedding the prompt
                cached = {r.ref: self._cached(r) for r in routed}
                missing = [r for r in routed if cached[r.ref] is None]
                vectors = await self._encode([text, *(t for r in missing for t in route_texts(r))])
                # The fresh rows serve this decision directly, whatever the bounded cache keeps of them.
                cached |= self._remember(missing, vectors[1:])
                decision = decide(vectors[0], cached, self.threshold)
            chosen = next((r for r in routed if r.ref == decision.chosen), None)
            outcome = spans.ROUTED_ADAPTER if chosen is not None else spans.ROUTED_BASE
            span.set_attributes(
                {
                    spans.ROUTE_CANDIDATES: list(decision.scores),
                    spans.ROUTE_SCORES: [round(s, 4) for s in decision.scores.values()],
                    spans.ROUTE_CHOSEN: decision.chosen or "",
                    spans.ROUTE_OUTCOME: outcome,
                    spans.ROUTE_THRESHOLD: self.threshold,
                }
            )
        self._metrics.route_decisions.labels(outcome).inc()
        self._metrics.route_seconds.observe(elapsed_since(started))
        return RouteChoice(chosen, decision)

    async def warm(self, records: Sequence[AdapterRecord]) -> int:
        """Embed the routes of `records` not cached yet, a batch at a time; how many were embedded."""
        missing = [r for r in records if route_texts(r) and self._cached(r) is None]
        done = 0
        while missing:
            batch: list[AdapterRecord] = []
            while missing and sum(len(route_texts(r)) for r in batch) < WARM_BATCH:
                batch.append(missing.pop())
            vectors = await self._encode([t for r in batch for t in route_texts(r)])
            self._remember(batch, vectors)
            done += len(batch)
        return done

    async def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._encoder is None:
            self.start()
        assert self._encoder is not None
        try:
            encoder = await asyncio.shield(self._encoder)
        except Exception as exc:
            raise ServiceUnavailableError("Routing (model 'auto') is unavailable on this replica.") from exc
        return await asyncio.wrap_future(self._thread.submit(encoder.encode, texts))

    def _key(self, record: AdapterRecord) -> tuple[str, tuple[str, ...]]:
        return record.versioned_ref, route_texts(record)

    def _cached(self, record: AdapterRecord) -> np.ndarray | None:
        key = self._key(record)
        vectors = self._routes.get(key)
        if vectors is not None:
            self._routes.move_to_end(key)
        return vectors

    def _remember(self, records: Sequence[AdapterRecord], vectors: np.ndarray) -> dict[str, np.ndarray]:
        """`vectors`: the rows of `records`' route texts, in order; returned per ref as well."""
        rows, start = {}, 0
        for record in records:
            count = len(route_texts(record))
            rows[record.ref] = self._routes[self._key(record)] = vectors[start : start + count]
            start += count
        while len(self._routes) > MAX_CACHED_RECORDS:
            self._routes.popitem(last=False)
        return rows
