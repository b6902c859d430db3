"""The reference: transformers + PEFT greedy decoding in float32, one adapter at a time.

For greedy decoding the gateway's output for adapter X must equal this, whatever else was
in the engine's batch. Tests and the soak benchmark check served outputs against it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


class ReferenceModel:
    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)

    @lru_cache(maxsize=16)
    def _model(self, adapter_dir: Path | None) -> Any:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        return model.eval()

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def greedy_ids(self, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        import torch

        model = self._model(adapter_dir)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return out[0, len(prompt_ids) :].tolist()
