"""OpenAI request bodies, validated strictly: a wrong type, a value out of range or an
unsupported field is a 400 that names the field (no silent coercion, no silent ignoring)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from gateway.engine.interface import SamplingOptions
from gateway.errors import InvalidRequestError, UnsupportedParameterError

MAX_N = 16
MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 5
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = _STRICT

    model: str = Field(min_length=1, max_length=200)
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # the engine's seeds are 64-bit
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)  # accepted for compatibility, unused
    # vLLM's extension: logprobs name tokens as `token_id:N`, exact even for partial UTF-8.
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def top_logprobs_k(self) -> int | None:
        """Alternatives per generated token; None: no logprobs at all."""
        raise NotImplementedError

    def sampling_options(self, max_tokens: int) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            seed=self.seed,
            stop=self.stop_sequences(),
            logprobs=self.top_logprobs_k(),
            incremental=self.stream,
        )


class CompletionRequest(_SamplingRequest):
    # Not empty, as a constraint (not a validator) so that the OpenAPI schema says so too.
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def top_logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        # Templates know system/user/assistant; "developer" is OpenAI's newer name for system.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
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
