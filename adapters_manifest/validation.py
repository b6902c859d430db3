"""Strict validation of a PEFT LoRA adapter folder, shared by every upload path and run again
before the gateway loads an adapter into the engine: a bad adapter is refused with a message
naming the problem, and never reaches vLLM.

Nothing is unpickled: the config is JSON, the weights are judged by their safetensors header,
then their values are read in bounded chunks (tensor_values.py). Messages name files by their
role, never by a server path, because they go back to HTTP clients.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_manifest.record import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE
from adapters_manifest.safetensors_header import (
    HeaderError,
    TensorInfo,
    base_weight_shapes,
    read_header,
    refuse_duplicate_keys,
)
from adapters_manifest.tensor_values import SERVING_MAX, TensorValueError, check_values

# Pickle-based checkpoints: loading one runs whatever code its author put in it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# PEFT's save_pretrained writes a model card beside the two files; it is never uploaded.
IGNORED_FILES = ("README.md",)
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
# The only tensor names PEFT saves for a LoRA without extras (it strips the adapter name).
LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>\w+(?:\.\w+)*)\.lora_(?P<which>[AB])\.weight")
MODULE_NAME = re.compile(r"\w+(?:\.\w+)*")
# inits that only choose the starting weights; the others (PiSSA, OLoRA, LoftQ, ...) change the base.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT features vLLM cannot serve (or that change shapes per module), refused when set.
UNSUPPORTED_FEATURES = {
    "lora_bias": "LoRA bias is not supported by vLLM",
    "rank_pattern": "per-module ranks are not supported; train with a single r",
    "alpha_pattern": "per-module alphas are not supported; train with a single lora_alpha",
    "target_parameters": "LoRA on raw parameters (e.g. fused MoE experts) is not supported",
    "trainable_token_indices": "trained token embeddings are not supported by vLLM",
    "layer_replication": "layer_replication is not supported by vLLM",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported by vLLM",
    "use_qalora": "QALoRA is not supported by vLLM",
    "use_bdlora": "block-diagonal LoRA is not supported by vLLM",
}


class AdapterValidationError(ValueError):
    """The adapter is refused; the message says why."""


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base's linear modules and the engine's largest rank."""

    module_shapes: dict[str, tuple[int, int]]  # "model.layers.0.self_attn.q_proj" -> (out, in)
    max_lora_rank: int | None = None
    serving_dtype: str | None = None  # float16, bfloat16 or float32; None: unknown (finiteness only)

    @classmethod
    def from_model_dir(cls, path: Path, max_lora_rank: int | None = None, dtype: str = "auto") -> BaseModelSpec:
        """From the base's safetensors headers: every 2-D `.weight` is a module LoRA may target.
        `dtype` as the gateway's --dtype: auto is the model config's."""
        modules = {
            name.removesuffix(".weight"): (shape[0], shape[1])
            for name, shape in base_weight_shapes(path).items()
            if name.endswith(".weight") and len(shape) == 2
        }
        serving = dtype if dtype != "auto" else _config_dtype(path)
        return cls(module_shapes=modules, max_lora_rank=max_lora_rank, serving_dtype=serving)


def _config_dtype(model_dir: Path) -> str | None:
    """The dtype a Hugging Face config declares (`torch_dtype`, or `dtype` in newer ones)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    declared = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return declared if declared in SERVING_MAX else None


@dataclass(frozen=True)
class ValidationLimits:
    max_weights_bytes: int = 512 << 20
    max_config_bytes: int = 64 << 10
    # A PEFT header is ~130 bytes a tensor: 1 MiB is some 7,500 tensors, five times what an adapter on
    # every linear layer of an 80-layer model has; parsing more only costs the event loop's time.
    max_header_bytes: int = 1 << 20


@dataclass(frozen=True)
class AdapterSummary:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # sorted, as the record stores them


def validate_adapter_dir(
    folder: Path, base: BaseModelSpec | None, limits: ValidationLimits = ValidationLimits()
) -> AdapterSummary:
    """Refuse (AdapterValidationError) anything the engine should not load; `base` None means
    structural checks only (no rank limit, no module or shape checks against a base)."""
    _check_files(folder, limits)
    summary = _check_config(read_config(folder), base)
    header = _check_tensors(folder / WEIGHTS_FILE, summary, base, limits)
    try:
        check_values(folder / WEIGHTS_FILE, header, base.serving_dtype if base is not None else None)
    except TensorValueError as e:
        raise AdapterValidationError(f"{WEIGHTS_FILE}: {e}") from None
    return summary


def _check_files(folder: Path, limits: ValidationLimits) -> None:
    if not folder.is_dir():
        raise AdapterValidationError("the adapter is not a folder")
    names = sorted(entry.name for entry in folder.iterdir())
    for name in names:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterValidationError(
                f"{name} is a pickle file, and unpickling can execute arbitrary code: adapters must be "
                f"safetensors ({CONFIG_FILE} and {WEIGHTS_FILE}; PEFT writes them with "
                "save_pretrained(..., safe_serialization=True)); remove the pickle file"
            )
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise AdapterValidationError(f"missing {name}")
    extra = [n for n in names if n not in ADAPTER_FILES + IGNORED_FILES and not n.startswith(".")]
    if extra:
        raise AdapterValidationError(
            f"unexpected file {', '.join(extra)}: an adapter is exactly {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    for name, limit in ((CONFIG_FILE, limits.max_config_bytes), (WEIGHTS_FILE, limits.max_weights_bytes)):
        size = (folder / name).stat().st_size
        if size > limit:
            raise AdapterValidationError(f"{name} is {size} bytes, over the {limit}-byte limit")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's adapter_config.json, the one way it is parsed: a JSON object without repeated keys."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_bytes(), object_pairs_hook=refuse_duplicate_keys)
    except (ValueError, RecursionError) as e:  # bad encoding, bad JSON, duplicate keys, absurd nesting
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} must be a JSON object, not a {type(config).__name__}")
    return config


def _check_config(config: dict[str, Any], base: BaseModelSpec | None) -> AdapterSummary:
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterValidationError(f'{CONFIG_FILE} has no peft_type; expected "LORA"')
    if peft_type != "LORA":
        raise AdapterValidationError(f"peft_type {peft_type!r} is not supported: only LORA adapters can be served")

    for field, meaning in (("r", "the LoRA rank"), ("lora_alpha", "the scale"), ("target_modules", "")):
        if field not in config:
            raise AdapterValidationError(f"{CONFIG_FILE} has no {field}" + (f" ({meaning})" if meaning else ""))
    rank, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if not _is_int(rank) or rank <= 0:
        raise AdapterValidationError(f"r must be a positive integer, got {rank!r}")
    if not (_is_int(alpha) or isinstance(alpha, float)) or not math.isfinite(alpha):
        raise AdapterValidationError(f"lora_alpha must be a finite number, got {alpha!r}")
    if isinstance(targets, str):
        # PEFT reads a string as a regular expression over full module paths; a list is explicit
        # and can be checked without a base model (and without running someone's regex).
        raise AdapterValidationError(
            f"target_modules is the string {targets!r}, which PEFT reads as a regular expression; "
            'list the module names instead, e.g. ["q_proj", "v_proj"]'
        )
    if not isinstance(targets, list) or not targets:
        raise AdapterValidationError(f"target_modules must be a non-empty list of module names, got {targets!r}")
    for target in targets:
        if not isinstance(target, str) or not MODULE_NAME.fullmatch(target):
            raise AdapterValidationError(f"target_modules entry {target!r} is not a module name")

    if config.get("use_dora"):
        raise AdapterValidationError("use_dora is true: DoRA adapters cannot be served (vLLM does not support DoRA)")
    if config.get("modules_to_save"):
        raise AdapterValidationError(
            f"modules_to_save {config['modules_to_save']!r} is set: vLLM cannot serve fully trained modules; "
            "train without modules_to_save"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterValidationError(f'bias {bias!r} is not supported: only bias "none" can be served')
    for field, why in UNSUPPORTED_FEATURES.items():
        if config.get(field):
            raise AdapterValidationError(f"{field} is set: {why}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        raise AdapterValidationError(
            f"init_lora_weights {init!r} modifies the base model's weights, which the gateway serves unchanged; "
            "convert the adapter to a plain LoRA first"
        )

    if base is not None:
        if base.max_lora_rank is not None and rank > base.max_lora_rank:
            raise AdapterValidationError(f"rank {rank} exceeds max_lora_rank {base.max_lora_rank}")
        for target in targets:
            if not any(_targets(path, target) for path in base.module_shapes):
                leaves = sorted({path.rsplit(".", 1)[-1] for path in base.module_shapes})
                raise AdapterValidationError(
                    f"target module {target!r} is not in the base model (its modules: {', '.join(leaves[:20])})"
                )
    return AdapterSummary(rank=rank, alpha=float(alpha), target_modules=tuple(sorted(set(targets))))


def _check_tensors(
    path: Path, summary: AdapterSummary, base: BaseModelSpec | None, limits: ValidationLimits
) -> dict[str, TensorInfo]:
    try:
        header = read_header(path, limits.max_header_bytes)
    except HeaderError as e:
        raise AdapterValidationError(f"{WEIGHTS_FILE}: {e}") from None
    if not header:
        raise AdapterValidationError(f"{WEIGHTS_FILE} holds no tensors")

    modules: dict[str, dict[str, tuple[str, TensorInfo]]] = {}  # module -> "A"/"B" -> (name, info)
    for name, info in sorted(header.items()):
        if info.dtype not in DTYPE_SIZES:
            raise AdapterValidationError(
                f"tensor {name} has dtype {info.dtype}; only {', '.join(DTYPE_SIZES)} are accepted"
            )
        if math.prod(info.shape) * DTYPE_SIZES[info.dtype] != info.nbytes:
            raise AdapterValidationError(
                f"tensor {name} has {info.nbytes} bytes of data, "
                f"not what shape {list(info.shape)} of {info.dtype} needs"
            )
        match = LORA_TENSOR.fullmatch(name)
        if match is None:
            raise AdapterValidationError(
                f"unexpected tensor {name}: an adapter holds only base_model.model.<module>.lora_A.weight "
                "and .lora_B.weight tensors (no modules_to_save, embedding or DoRA weights)"
            )
        modules.setdefault(match["module"], {})[match["which"]] = (name, info)

    rank = summary.rank
    for module, pair in sorted(modules.items()):
        for which, other in (("A", "B"), ("B", "A")):
            if other not in pair:
                raise AdapterValidationError(f"tensor {pair[which][0]} has no matching lora_{other} tensor")
        if not any(_targets(module, target) for target in summary.target_modules):
            raise AdapterValidationError(
                f"tensor {pair['A'][0]} is for module {module}, which is not in target_modules "
                f"{list(summary.target_modules)}"
            )
        base_shape = base.module_shapes.get(module) if base is not None else None
        if base is not None and base_shape is None:
            raise AdapterValidationError(f"tensor {pair['A'][0]} is for module {module}, which the base model lacks")
        (a_name, a), (b_name, b) = pair["A"], pair["B"]
        for name, info in ((a_name, a), (b_name, b)):
            if len(info.shape) != 2:
                raise AdapterValidationError(f"tensor {name} has shape {list(info.shape)}, expected a matrix")
        # lora_A is [r, in_features], lora_B is [out_features, r]; without a base, the tensors'
        # own outer dimensions stand in and only the rank is checked.
        out_features, in_features = base_shape or (b.shape[0], a.shape[1])
        why = f"r = {rank} in {CONFIG_FILE}" + (
            f"; base module {module} has out_features {out_features}, in_features {in_features}" if base_shape else ""
        )
        for name, info, expected in ((a_name, a, [rank, in_features]), (b_name, b, [out_features, rank])):
            if list(info.shape) != expected:
                raise AdapterValidationError(f"tensor {name} has shape {list(info.shape)}, expected {expected} ({why})")
    return header


def _targets(module_path: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's full path, or a suffix of it at a '.'."""
    return module_path == target or module_path.endswith("." + target)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
