"""AdapterCatalog: which adapters exist, and what a request's `model` names."""

from __future__ import annotations

import logging

from adapters_manifest.record import AdapterRecord, check_name
from adapters_manifest.store import AdapterStore
from gateway.errors import ModelNotFoundError

log = logging.getLogger(__name__)


class AdapterCatalog:
    def __init__(self, store: AdapterStore, base_model_name: str) -> None:
        self._store = store
        self.base_model_name = base_model_name
        self._records: dict[str, AdapterRecord] = {}
        self.synced = False

    async def refresh(self) -> None:
        """Replace the known set with a full listing of the store."""
        records = await self._store.list_records()
        self._records = {r.ref: r for r in records}
        self.synced = True
        log.info("catalog: %d adapters in %s", len(self._records), self._store.url)

    def records(self) -> list[AdapterRecord]:
        return sorted(self._records.values(), key=lambda r: r.ref)

    async def resolve(self, model: str) -> AdapterRecord | None:
        """None for the base model, the record for `owner/name`; ModelNotFoundError otherwise."""
        if model == self.base_model_name:
            return None
        owner, _, name = model.partition("/")
        try:
            check_name(owner, "owner")
            check_name(name)
        except ValueError:
            # Never touch the store with a name that could not exist (traversal, odd bytes).
            raise ModelNotFoundError(model) from None
        record = self._records.get(model)
        if record is None:
            # Not seen yet: it may have been published since the last listing.
            record = await self._store.get_record(owner, name)
            if record is None:
                raise ModelNotFoundError(model)
            self._records[model] = record
        return record
