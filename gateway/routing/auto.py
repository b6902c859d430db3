"""`model: "auto"` on a request: whose adapters it routes among, and which model then serves it."""

from __future__ import annotations

from typing import Any

from gateway.auth.keys import Principal
from gateway.catalog import AdapterCatalog
from gateway.errors import ModelNotFoundError
from gateway.routing.prompt import routable_text
from gateway.routing.router import Router, route_texts

AUTO = "auto"
ROUTED_MODEL_HEADER = "X-Routed-Model"  # the model that answered a routed request (also its body's `model`)


def auto_namespace(model: str, user: str) -> str | None:
    """Whose adapters `model` routes among: `auto` the caller's own, `owner/auto` owner's; None if
    `model` is no routing name."""
    owner, slash, name = model.rpartition("/")
    if name != AUTO:
        return None
    return owner if slash else user


async def routed_model(router: Router, catalog: AdapterCatalog, principal: Principal, body: Any, owner: str) -> str:
    """The model that serves `body`: the best-matching adapter of `owner` that `principal` may use, or
    the base. `owner/auto` with no adapter the caller may route to is as missing as any unknown model
    (the same answer whether owner has private adapters or none)."""
    candidates = [r for r in catalog.owned_by(owner) if catalog.may_use(principal, r) and route_texts(r)]
    if not candidates and owner != principal.user:
        raise ModelNotFoundError(body.model)
    choice = await router.choose(routable_text(body), candidates)
    return catalog.base_model_name if choice.record is None else choice.record.ref
