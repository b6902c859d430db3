"""The strict gate in front of vLLM's OpenAI layer: a request body is validated with vLLM's own protocol
models, and a field they do not know is a 400 that names it (OpenAI refuses unknown fields; vLLM only
logs them, so a typo or a field this vLLM version removed would otherwise be silently ignored)."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gateway.errors import InvalidRequestError, UnsupportedParameterError

# vLLM removed these; it ignores them, so output would silently not be constrained.
REMOVED_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend")
REMOVED_HINT = " vLLM removed the guided_* fields: use 'structured_outputs' or 'response_format' instead."


def parse_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """Validate a decoded JSON object; the first problem becomes a 400 naming its field."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path, in_union = _field_path(model, first)
        if in_union:
            # A union reports one error per member ('str', 'list[int]'); explain with the most
            # specific one (`stop: [""]` is an empty string, not "not a string").
            alternatives = [e for e in errors if _field_path(model, e)[0][: len(path)] == path]
            first = max(alternatives, key=lambda e: (len(_field_path(model, e)[0]), not e["type"].endswith("_type")))
            path, _ = _field_path(model, first)
        param = ".".join(str(p) for p in path) or None
        if first["type"] == "extra_forbidden":
            raise UnsupportedParameterError(f"Unsupported parameter: '{param}'.", param=param) from None
        if first["type"] == "missing":
            raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param) from None
        message = first["msg"].removeprefix("Value error, ")
        where = f"'{param}': " if param else ""
        raise InvalidRequestError(f"Invalid value for {where}{message}.", param=param) from None
    unknown = unknown_fields(parsed)
    if unknown:
        hint = REMOVED_HINT if unknown[0].split(".")[-1] in REMOVED_GUIDED_FIELDS else ""
        raise UnsupportedParameterError(f"Unsupported parameter: '{unknown[0]}'.{hint}", param=unknown[0])
    return parsed


def unknown_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of the fields a validated body carried that its models do not declare (vLLM's
    models keep them as extras), in the nested models too."""
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in unknown_fields(item, f"{path}.{i}")]
    if not isinstance(value, BaseModel):
        return []
    prefix = f"{path}." if path else ""
    found = [f"{prefix}{name}" for name in (value.model_extra or {})]
    for name in type(value).model_fields:
        found += unknown_fields(getattr(value, name), f"{prefix}{name}")
    return found


def _field_path(model: type[BaseModel], error: ErrorDetails) -> tuple[list[int | str], bool]:
    """An error's location as the client wrote it: field names and list indexes, without the
    tags pydantic adds for union members (`prompt.str` -> `prompt`); and whether it had any."""
    path: list[int | str] = []
    in_union = False
    current: type[BaseModel] | None = model
    loc = error["loc"]
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path.append(part)
        elif current is not None and part in current.model_fields:
            path.append(part)
            current = _model_in(current.model_fields[part].annotation)
        elif error["type"] == "extra_forbidden" and i == len(loc) - 1:
            path.append(part)  # the unknown field itself
        else:
            in_union = True
    return path, in_union


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or inside list/union/Annotated (None: plain values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
