"""A tiny Llama-architecture model and LoRA adapters, built offline and deterministically.

Used by the demo, the tests and the benchmarks: no download, a few seconds on a CPU.
"""

from __future__ import annotations

import asyncio
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, validated_record
from adapters_manifest.record import AdapterRecord
from adapters_manifest.validation import BaseModelSpec

BASE_MODEL_NAME = "tiny-llama"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
# ChatML-style: one line per message, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA_TARGET_MODULES = ["q_proj", "v_proj", "o_proj"]
SEED = 1234


@dataclass(frozen=True)
class TinyModel:
    base: Path
    store: Path
    adapters: list[AdapterRecord]


def _training_text(limit: int = 120) -> list[str]:
    """The Python standard library's own sources: on every machine, never downloaded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_base_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: the CPU attention kernels reject 16
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)


def build_adapter(base: Path, out: Path, seed: int, rank: int, lora_b_std: float = 0.5) -> None:
    """A PEFT LoRA whose B matrices are random, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_MODULES)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, lora_b_std)
    peft_model.save_pretrained(out, safe_serialization=True)


def make_model(out: Path, adapters: list[str], rank: int = 8) -> TinyModel:
    """Write OUT/base and OUT/store with one adapter per `owner/name`."""
    base = out / "base"
    store_root = out / "store"
    if not (base / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        build_tokenizer(base)
        build_base_model(base)
    store = LocalFolderStore(store_root)
    spec = BaseModelSpec.from_model_dir(base)
    records = []
    for ref in adapters:
        owner, _, name = ref.partition("/")
        if not name:
            raise ValueError(f"adapter {ref!r} must be named owner/name")
        with tempfile.TemporaryDirectory() as tmp:
            build_adapter(base, Path(tmp), seed=zlib.crc32(f"{ref}:{rank}".encode()), rank=rank)
            record = validated_record(Path(tmp), owner, name, base=spec, base_model=BASE_MODEL_NAME)
            records.append(asyncio.run(publish(store, Path(tmp), record)))
    return TinyModel(base=base, store=store_root, adapters=records)
