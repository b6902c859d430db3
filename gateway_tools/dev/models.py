"""The dev bases, offline: `tiny` (a random 0.3 M-parameter Llama, seconds to build, for fast tests)
and `smollm2` (SmolLM2-135M-Instruct from a PyPI wheel, a real model for the demo and the figures),
each with a local adapter store of seeded random LoRAs of its own shapes.
"""

from __future__ import annotations

import asyncio
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from adapters_manifest.local_store import LocalFolderStore
from adapters_manifest.publish import publish, validated_record
from adapters_manifest.record import AdapterRecord
from adapters_manifest.validation import BaseModelSpec
from gateway_tools.dev import smollm2, tiny_model

BASES = ("tiny", "smollm2")
SERVED_NAMES = {"tiny": tiny_model.BASE_MODEL_NAME, "smollm2": smollm2.SERVED_NAME}
LORA_TARGET_MODULES = ["q_proj", "v_proj", "o_proj"]
# The spread of the random B matrices: large enough that an adapter visibly changes greedy output,
# small enough that the real model still writes text (at 0.5 it repeats punctuation).
LORA_B_STD = {"tiny": 0.5, "smollm2": 0.25}


@dataclass(frozen=True)
class DevModel:
    base: Path
    store: Path
    adapters: list[AdapterRecord]
    served_name: str


def make_model(out: Path, adapters: list[str], rank: int = 8, base: str = "tiny", dtype: str = "float32") -> DevModel:
    """Write OUT/base (skipped when there) and OUT/store with one adapter per `owner/name`."""
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    base_dir = out / "base"
    if not (base_dir / "config.json").is_file():
        if base == "smollm2":
            smollm2.make_smollm2(base_dir, dtype)
        else:
            if dtype != "float32":
                raise ValueError("the tiny model is built in float32 only")
            base_dir.mkdir(parents=True, exist_ok=True)
            tiny_model.build_tokenizer(base_dir)
            tiny_model.build_base_model(base_dir)
    store = LocalFolderStore(out / "store")
    spec = BaseModelSpec.from_model_dir(base_dir)
    records = []
    for ref in adapters:
        owner, _, name = ref.partition("/")
        if not name:
            raise ValueError(f"adapter {ref!r} must be named owner/name")
        with tempfile.TemporaryDirectory() as tmp:
            seed = zlib.crc32(f"{ref}:{rank}".encode())
            build_adapter(base_dir, Path(tmp), seed=seed, rank=rank, lora_b_std=LORA_B_STD[base])
            record = validated_record(Path(tmp), owner, name, base=spec, base_model=SERVED_NAMES[base])
            records.append(asyncio.run(publish(store, Path(tmp), record)))
    return DevModel(base=base_dir, store=out / "store", adapters=records, served_name=SERVED_NAMES[base])


def build_adapter(base: Path, out: Path, seed: int, rank: int, lora_b_std: float = 0.5) -> None:
    """A PEFT LoRA whose B matrices are random, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_MODULES)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, lora_b_std)
    peft_model.save_pretrained(out, safe_serialization=True)
