"""What a request is about, as text the encoder can read: the text `model: "auto"` routes by."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError

# The encoder reads its first 256 tokens; more text only costs tokenizing (and a prompt may be huge).
MAX_ROUTED_CHARS = 2000


def routable_text(body: Any) -> str:
    """The last user message of a chat (or of a Responses input), or a completion's one prompt.

    Raises InvalidRequestError where there is nothing to route by: token ids, several prompts,
    no user text."""
    if hasattr(body, "messages"):
        text = _last_user_text(body.messages)
    elif hasattr(body, "input"):
        text = body.input if isinstance(body.input, str) else _last_user_text(body.input)
    else:
        text = _completion_prompt(getattr(body, "prompt", None))
    if text is None or not text.strip():
        raise InvalidRequestError(
            "model 'auto' routes by the request's text: it needs a user message with text.", param="messages"
        )
    return text.strip()[:MAX_ROUTED_CHARS]


def _completion_prompt(prompt: Any) -> str | None:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    raise InvalidRequestError("model 'auto' routes by text: send one prompt string.", param="prompt")


def _last_user_text(messages: Any) -> str | None:
    for message in reversed(list(messages or [])):
        if _field(message, "role") == "user":
            return _text_of(_field(message, "content"))
    return None


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or its text parts joined (images and other parts carry none)."""
    if isinstance(content, str):
        return content
    parts = [_field(part, "text") for part in content or [] if _field(part, "type") in ("text", "input_text")]
    return "\n".join(p for p in parts if isinstance(p, str)) or None


def _field(item: Any, name: str) -> Any:
    """vLLM's protocol keeps messages as dicts and Responses items as models: read either."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
