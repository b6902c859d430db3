"""The reference: transformers + PEFT greedy decoding in float32, one adapter at a time.

For greedy decoding the gateway's output for adapter X must equal this, whatever else was
in the engine's batch. Tests and the soak benchmark check served outputs against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ReferenceModel:
    """One base model in memory; each adapter is loaded into it once and switched on per call, so a
    real model with several adapters costs one model's memory, not one per adapter."""

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self._model: Any = None  # the base, wrapped by PEFT once an adapter is asked for
        self._names: dict[Path, str] = {}  # adapter folder -> PEFT adapter name (no dots allowed there)

    def _loaded(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).eval()
        return self._model

    def _with_adapter(self, adapter_dir: Path) -> Any:
        from peft import PeftModel

        model = self._loaded()
        name = self._names.setdefault(adapter_dir, f"adapter{len(self._names)}")
        if not isinstance(model, PeftModel):
            model = self._model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name).eval()
        elif name not in model.peft_config:
            model.load_adapter(adapter_dir, adapter_name=name)
        model.set_adapter(name)
        return model

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def greedy_ids(self, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens for the base (`adapter_dir` None) or one adapter, stopping at end-of-sequence."""
        import contextlib

        import torch
        from peft import PeftModel

        if adapter_dir is None:
            model = self._loaded()
            adapters_off = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
        else:
            model, adapters_off = self._with_adapter(adapter_dir), contextlib.nullcontext()
        with torch.no_grad(), adapters_off:
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return out[0, len(prompt_ids) :].tolist()
