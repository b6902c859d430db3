"""OpenAI response shapes for text completions and chat completions, whole and streamed."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.interface import ChoiceDelta, TokenLogprob


@dataclass
class ChoiceState:
    """What one choice has produced so far (for whole responses and text offsets)."""

    index: int
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # chat streams announce the role once

    def add(self, delta: ChoiceDelta) -> int:
        """Append a delta; returns the text offset where it begins."""
        offset = len(self.text)
        self.text += delta.text
        self.token_count += delta.token_count
        self.logprobs.extend(delta.logprobs or [])
        self.finish_reason = delta.finish_reason or self.finish_reason
        return offset


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseFormat:
    """The parts that differ between /v1/completions and /v1/chat/completions."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(self, model: str, want_logprobs: bool, tokens_as_ids: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.want_logprobs = want_logprobs
        self.tokens_as_ids = tokens_as_ids

    def label(self, token_id: int, token: str) -> str:
        """A token as logprobs show it: its text, or `token_id:N` (vLLM's extension, exact)."""
        return f"token_id:{token_id}" if self.tokens_as_ids else token

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, choices: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
        body = self._envelope(self.object_name, [self.whole_choice(c) for c in choices])
        body["usage"] = usage(prompt_tokens, sum(c.token_count for c in choices))
        return body

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return self._envelope(self.chunk_object_name, [choice])

    def usage_chunk(self, choices: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = usage(prompt_tokens, sum(c.token_count for c in choices))
        return body

    def whole_choice(self, state: ChoiceState) -> dict[str, Any]:
        raise NotImplementedError

    def stream_choices(self, state: ChoiceState, delta: ChoiceDelta, offset: int) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return {
            "tokens": [self.label(e.token_id, e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.label(a.token_id, a.token): a.logprob for a in e.top} for e in entries],
            "text_offset": offsets,
        }

    def whole_choice(self, state: ChoiceState) -> dict[str, Any]:
        return {
            "index": state.index,
            "text": state.text,
            "logprobs": self._logprobs(state.logprobs, 0),
            "finish_reason": state.finish_reason,
        }

    def stream_choices(self, state: ChoiceState, delta: ChoiceDelta, offset: int) -> list[dict[str, Any]]:
        return [
            {
                "index": delta.index,
                "text": delta.text,
                "logprobs": self._logprobs(delta.logprobs or [], offset),
                "finish_reason": delta.finish_reason,
            }
        ]


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None

        def token_entry(token_id: int, token: str, logprob: float) -> dict[str, Any]:
            return {"token": self.label(token_id, token), "logprob": logprob, "bytes": list(token.encode())}

        return {
            "content": [
                {
                    **token_entry(e.token_id, e.token, e.logprob),
                    "top_logprobs": [token_entry(a.token_id, a.token, a.logprob) for a in e.top],
                }
                for e in entries
            ]
        }

    def whole_choice(self, state: ChoiceState) -> dict[str, Any]:
        return {
            "index": state.index,
            "message": {"role": "assistant", "content": state.text},
            "logprobs": self._logprobs(state.logprobs),
            "finish_reason": state.finish_reason,
        }

    def stream_choices(self, state: ChoiceState, delta: ChoiceDelta, offset: int) -> list[dict[str, Any]]:
        choices = []
        if not state.started:
            state.started = True
            choices.append({"index": delta.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        if delta.text or delta.logprobs:
            choices.append(
                {
                    "index": delta.index,
                    "delta": {"content": delta.text},
                    "logprobs": self._logprobs(delta.logprobs or []),
                    "finish_reason": None,
                }
            )
        if delta.finish_reason is not None:
            choices.append({"index": delta.index, "delta": {}, "finish_reason": delta.finish_reason})
        return choices
