"""An all-zero LoRA adapter for base-model requests.

vLLM's CPU LoRA kernels index the stacked adapter weights with each token's slot, and "no
adapter" is -1, which Python reads as the *last* slot: a base request batched next to adapter
requests silently gets someone's adapter (vLLM 0.32's CPU punica path; the e2e oracle tests
catch it). A request that carries an adapter
whose weights are all zero computes exactly the base model, whatever shares its batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapters_manifest.safetensors_header import base_weight_shapes

# Modules vLLM can attach LoRA to, in order of preference; one is enough for a zero adapter.
_CANDIDATE_MODULES = ("q_proj", "o_proj", "qkv_proj", "down_proj", "dense", "c_attn")


def write_zero_adapter(model_dir: Path, out: Path) -> Path:
    """Write a rank-1 adapter of zeros on one attention module of every layer."""
    shapes = base_weight_shapes(model_dir)
    for module in _CANDIDATE_MODULES:
        targets = {
            name.removesuffix(".weight"): shape
            for name, shape in shapes.items()
            if name.endswith(f".{module}.weight") and len(shape) == 2
        }
        if targets:
            break
    else:
        raise ValueError(f"no LoRA-capable module ({', '.join(_CANDIDATE_MODULES)}) in {model_dir}")

    tensors = {}
    for path, (out_features, in_features) in targets.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.zeros((1, in_features), np.float32)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.zeros((out_features, 1), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module],
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
