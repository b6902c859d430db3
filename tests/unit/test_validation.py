"""The bad-adapter corpus: each one refused with its own message; real PEFT adapters pass."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters_manifest.validation import (
    AdapterValidationError,
    BaseModelSpec,
    ValidationLimits,
    validate_adapter_dir,
)
from gateway.engine.zero_adapter import write_zero_adapter
from gateway_tools.dev.models import LORA_TARGET_MODULES, build_adapter
from gateway_tools.dev.tiny_model import build_base_model, build_tokenizer

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V_B = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"


@dataclass(frozen=True)
class Tiny:
    base: Path
    adapters: dict[int, Path]  # rank -> a PEFT adapter folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    base = root / "base"
    base.mkdir()
    build_tokenizer(base)
    build_base_model(base)
    adapters = {rank: root / f"r{rank}" for rank in (8, 16)}
    for rank, folder in adapters.items():
        build_adapter(base, folder, seed=rank, rank=rank)
    return Tiny(base=base, adapters=adapters)


@pytest.fixture(scope="session")
def spec(tiny: Tiny) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(tiny.base, max_lora_rank=16)


@pytest.fixture
def adapter(tiny: Tiny, tmp_path: Path) -> Path:
    """A fresh copy of the good rank-8 adapter, to break."""
    return Path(shutil.copytree(tiny.adapters[8], tmp_path / "adapter"))


# --- ways to break an adapter ---------------------------------------------------------


def edit_config(**changes: Any) -> Callable[[Path], None]:
    """Set fields; a value of ... deletes the field."""

    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        for key, value in changes.items():
            if value is ...:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / CONFIG).write_text(json.dumps(config))

    return edit


def edit_tensors(changes: dict[str, np.ndarray | None]) -> Callable[[Path], None]:
    """Add or replace tensors; None removes one."""

    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        for name, value in changes.items():
            if value is None:
                del tensors[name]
            else:
                tensors[name] = value
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})

    return edit


def tensor(name: str, array: np.ndarray) -> Callable[[Path], None]:
    return edit_tensors({name: array})


def write_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def remove_file(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-100])


def header_not_json(folder: Path) -> None:
    header = b"{not json at all"
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def header_too_long(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for e in edits:
            e(folder)

    return edit


def pickle_only(folder: Path) -> None:
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")


LIMITS = ValidationLimits()
CORPUS: list[tuple[str, Callable[[Path], None], ValidationLimits, str]] = [
    ("pickle bin only", pickle_only, LIMITS, "adapter_model.bin is a pickle file, and unpickling can execute"),
    ("bin beside safetensors", write_file("adapter_model.bin", b"\x80\x04."), LIMITS, "adapter_model.bin is a pickle"),
    ("pt file", write_file("optimizer.pt", b"\x80\x04."), LIMITS, "optimizer.pt is a pickle"),
    ("missing config", remove_file(CONFIG), LIMITS, "missing adapter_config.json"),
    ("missing weights", remove_file(WEIGHTS), LIMITS, "missing adapter_model.safetensors"),
    ("extra file", write_file("tokenizer.json", b"{}"), LIMITS, "unexpected file tokenizer.json"),
    ("weights too big", lambda f: None, ValidationLimits(max_weights_bytes=1000), "over the 1000-byte limit"),
    ("config too big", lambda f: None, ValidationLimits(max_config_bytes=100), "adapter_config.json is"),
    ("config not json", write_file(CONFIG, b"{'r': 8,"), LIMITS, "adapter_config.json is not valid JSON"),
    ("config a list", write_file(CONFIG, b"[1, 2]"), LIMITS, "must be a JSON object, not a list"),
    ("config duplicate key", write_file(CONFIG, b'{"r": 8, "r": 8}'), LIMITS, "duplicate key 'r'"),
    ("no peft_type", edit_config(peft_type=...), LIMITS, "has no peft_type"),
    ("not lora", edit_config(peft_type="IA3"), LIMITS, "peft_type 'IA3' is not supported"),
    ("missing r", edit_config(r=...), LIMITS, "has no r (the LoRA rank)"),
    ("missing lora_alpha", edit_config(lora_alpha=...), LIMITS, "has no lora_alpha"),
    ("missing target_modules", edit_config(target_modules=...), LIMITS, "has no target_modules"),
    ("r zero", edit_config(r=0), LIMITS, "r must be a positive integer, got 0"),
    ("r negative", edit_config(r=-4), LIMITS, "r must be a positive integer, got -4"),
    ("r string", edit_config(r="8"), LIMITS, "r must be a positive integer, got '8'"),
    ("r bool", edit_config(r=True), LIMITS, "r must be a positive integer, got True"),
    ("alpha string", edit_config(lora_alpha="16"), LIMITS, "lora_alpha must be a finite number"),
    ("targets regex", edit_config(target_modules=".*proj"), LIMITS, "PEFT reads as a regular expression"),
    ("targets empty", edit_config(target_modules=[]), LIMITS, "target_modules must be a non-empty list"),
    ("target not a name", edit_config(target_modules=["q_proj", 3]), LIMITS, "target_modules entry 3"),
    ("dora", edit_config(use_dora=True), LIMITS, "use_dora is true"),
    ("modules_to_save", edit_config(modules_to_save=["lm_head"]), LIMITS, "modules_to_save ['lm_head'] is set"),
    ("bias", edit_config(bias="all"), LIMITS, "bias 'all' is not supported"),
    ("lora_bias", edit_config(lora_bias=True), LIMITS, "lora_bias is set"),
    ("rank_pattern", edit_config(rank_pattern={"q_proj": 4}), LIMITS, "rank_pattern is set"),
    ("pissa init", edit_config(init_lora_weights="pissa"), LIMITS, "init_lora_weights 'pissa' modifies"),
    ("rank too big", edit_config(r=32), LIMITS, "rank 32 exceeds max_lora_rank 16"),
    (
        "unknown target",
        edit_config(target_modules=["q_proj", "foo_proj"]),
        LIMITS,
        "target module 'foo_proj' is not in",
    ),
    ("truncated", truncate, LIMITS, "run past the end of the"),
    ("header not json", header_not_json, LIMITS, "adapter_model.safetensors: header is not valid JSON"),
    ("header length too big", header_too_long, LIMITS, "bytes after the length prefix"),
    ("int64 dtype", tensor(Q_A, np.zeros((8, 128), np.int64)), LIMITS, f"tensor {Q_A} has dtype I64"),
    (
        "unexpected tensor",
        tensor("base_model.model.lm_head.weight", np.zeros((512, 128), np.float32)),
        LIMITS,
        "unexpected tensor base_model.model.lm_head.weight",
    ),
    (
        "adapter-named tensor",
        tensor(Q_A.replace("A.weight", "A.default.weight"), np.zeros((8, 128), np.float32)),
        LIMITS,
        "q_proj.lora_A.default.weight: an adapter holds only",
    ),
    ("lora_A without lora_B", edit_tensors({Q_B: None}), LIMITS, f"tensor {Q_A} has no matching lora_B"),
    (
        "module not targeted",
        both(
            tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", np.zeros((8, 128), np.float32)),
            tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", np.zeros((64, 8), np.float32)),
        ),
        LIMITS,
        "model.layers.0.self_attn.k_proj, which is not in target_modules",
    ),
    (
        "module not in base",
        both(
            edit_config(target_modules=[*LORA_TARGET_MODULES, "k_proj"]),
            tensor("base_model.model.model.layers.9.self_attn.k_proj.lora_A.weight", np.zeros((8, 128), np.float32)),
            tensor("base_model.model.model.layers.9.self_attn.k_proj.lora_B.weight", np.zeros((64, 8), np.float32)),
        ),
        LIMITS,
        "model.layers.9.self_attn.k_proj, which the base model lacks",
    ),
    (
        "lora_A in_features",
        tensor(Q_A, np.zeros((8, 64), np.float32)),
        LIMITS,
        f"tensor {Q_A} has shape [8, 64], expected [8, 128]",
    ),
    (
        "lora_B out_features",
        tensor(V_B, np.zeros((128, 8), np.float32)),
        LIMITS,
        f"tensor {V_B} has shape [128, 8], expected [64, 8]",
    ),
    (
        "rank differs from config",
        both(tensor(Q_A, np.zeros((4, 128), np.float32)), tensor(Q_B, np.zeros((128, 4), np.float32))),
        LIMITS,
        f"tensor {Q_A} has shape [4, 128], expected [8, 128] (r = 8 in adapter_config.json",
    ),
    ("3-d tensor", tensor(Q_A, np.zeros((8, 128, 1), np.float32)), LIMITS, "has shape [8, 128, 1], expected a matrix"),
]


@pytest.mark.parametrize(("break_it", "limits", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_adapter_is_refused_with_its_own_message(
    adapter: Path, spec: BaseModelSpec, break_it: Callable[[Path], None], limits: ValidationLimits, message: str
) -> None:
    break_it(adapter)
    with pytest.raises(AdapterValidationError) as refused:
        validate_adapter_dir(adapter, spec, limits)
    assert message in str(refused.value)


def test_every_corpus_message_is_distinct() -> None:
    messages = [c[3] for c in CORPUS]
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("rank", [8, 16])
def test_peft_adapters_pass_and_are_summarized(tiny: Tiny, spec: BaseModelSpec, rank: int) -> None:
    folder = tiny.adapters[rank]
    assert (folder / "README.md").is_file()  # PEFT's model card is tolerated
    config = json.loads((folder / CONFIG).read_text())
    summary = validate_adapter_dir(folder, spec)
    assert summary.rank == config["r"] == rank
    assert summary.alpha == config["lora_alpha"]
    assert summary.target_modules == tuple(sorted(config["target_modules"]))


def test_structural_checks_without_a_base(adapter: Path, tiny: Tiny) -> None:
    assert validate_adapter_dir(tiny.adapters[16], None).rank == 16
    # No rank limit, no base module check without a base...
    edit_config(target_modules=[*LORA_TARGET_MODULES, "foo_proj"])(adapter)
    assert validate_adapter_dir(adapter, None).target_modules[0] == "foo_proj"
    # ...but the tensors must still agree with the config's rank.
    edit_config(r=4)(adapter)
    with pytest.raises(AdapterValidationError, match=r"expected \[4, 128\] \(r = 4 in adapter_config.json\)"):
        validate_adapter_dir(adapter, None)


def test_the_zero_adapter_passes(tiny: Tiny, spec: BaseModelSpec, tmp_path: Path) -> None:
    summary = validate_adapter_dir(write_zero_adapter(tiny.base, tmp_path / "zero"), spec)
    assert summary.rank == 1 and summary.target_modules == ("q_proj",)


def test_base_spec_holds_linear_module_shapes(spec: BaseModelSpec) -> None:
    assert spec.module_shapes["model.layers.0.self_attn.q_proj"] == (128, 128)
    assert spec.module_shapes["model.layers.1.self_attn.v_proj"] == (64, 128)  # one KV head of 64
    assert not any(path.endswith("norm") for path in spec.module_shapes)  # 1-D weights are not modules


def test_hidden_files_are_ignored(adapter: Path, spec: BaseModelSpec) -> None:
    (adapter / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (adapter / ".cache").mkdir()
    assert validate_adapter_dir(adapter, spec).rank == 8


# --- the safetensors layout, byte by byte ------------------------------------------------


def raw_safetensors(folder: Path, header: dict[str, Any], data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * data_bytes)


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


A_ENTRY = entry("F32", [8, 128], 0, 4096)
LAYOUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("trailing bytes", {Q_A: A_ENTRY}, 4096 + 7, "7 bytes after the last tensor's data"),
    ("gap", {Q_A: entry("F32", [8, 128], 16, 4112)}, 4112, "leaving a gap after byte 0"),
    ("overlap", {Q_A: A_ENTRY, Q_B: entry("F32", [128, 8], 4000, 8096)}, 8096, "leaving an overlap after byte 4096"),
    ("offsets reversed", {Q_A: entry("F32", [8, 128], 4096, 0)}, 4096, "expected [begin, end] with begin <= end"),
    ("shape not ints", {Q_A: entry("F32", [8, "128"], 0, 4096)}, 4096, "expected a list of non-negative integers"),
    (
        "no dtype",
        {Q_A: {"shape": [8, 128], "data_offsets": [0, 4096]}},
        4096,
        "must have dtype, shape and data_offsets",
    ),
    ("bad metadata", {"__metadata__": {"format": 1}, Q_A: A_ENTRY}, 4096, "__metadata__ must be an object of strings"),
    ("header a list", [1], 0, "header is a JSON list, expected an object"),  # type: ignore[list-item]
    ("no tensors", {"__metadata__": {"format": "pt"}}, 0, "adapter_model.safetensors holds no tensors"),
    (
        "bytes do not fit the shape",
        {Q_A: entry("F16", [8, 128], 0, 4096)},
        4096,
        "has 4096 bytes of data, not what shape [8, 128] of F16 needs",
    ),
]


@pytest.mark.parametrize(("header", "data_bytes", "message"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_malformed_safetensors_layout_is_refused(
    adapter: Path, spec: BaseModelSpec, header: dict[str, Any], data_bytes: int, message: str
) -> None:
    raw_safetensors(adapter, header, data_bytes)
    with pytest.raises(AdapterValidationError) as refused:
        validate_adapter_dir(adapter, spec)
    assert message in str(refused.value)


@pytest.mark.parametrize("content", [b"", b"\x08\0\0", b"\x00" * 8])
def test_too_short_or_empty_weights_are_refused(adapter: Path, spec: BaseModelSpec, content: bytes) -> None:
    (adapter / WEIGHTS).write_bytes(content)
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors: "):
        validate_adapter_dir(adapter, spec)


def test_duplicate_tensor_names_are_refused(adapter: Path, spec: BaseModelSpec) -> None:
    encoded = ('{"%s": %s, "%s": %s}' % (Q_A, json.dumps(A_ENTRY), Q_A, json.dumps(A_ENTRY))).encode()
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 4096)
    with pytest.raises(AdapterValidationError, match="duplicate key"):
        validate_adapter_dir(adapter, spec)


def test_half_precision_adapters_pass(adapter: Path, spec: BaseModelSpec) -> None:
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(str(adapter / WEIGHTS))
    half = {name: t.to(torch.bfloat16 if "lora_A" in name else torch.float16) for name, t in tensors.items()}
    save_torch(half, str(adapter / WEIGHTS))
    assert validate_adapter_dir(adapter, spec).rank == 8


# -- tensor values -------------------------------------------------------------------------


def with_value(folder: Path, name: str, value: float, dtype: str = "float32") -> None:
    """Set one element of tensor `name` to `value`, stored as `dtype` (torch for bfloat16)."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(str(folder / WEIGHTS))
    changed = tensors[name].to(getattr(torch, dtype)).clone()
    changed.view(-1)[changed.numel() // 2] = value
    tensors[name] = changed
    save_torch(tensors, str(folder / WEIGHTS))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    ("value", "said"), [(float("nan"), "NaN"), (float("inf"), "infinity"), (-float("inf"), "infinity")]
)
def test_non_finite_values_are_refused_naming_the_tensor(
    adapter: Path, spec: BaseModelSpec, dtype: str, value: float, said: str
) -> None:
    with_value(adapter, V_B, value, dtype)
    with pytest.raises(AdapterValidationError, match=f"tensor {re.escape(V_B)} holds {said}"):
        validate_adapter_dir(adapter, spec)
    with pytest.raises(AdapterValidationError, match=f"tensor {re.escape(V_B)} holds {said}"):
        validate_adapter_dir(adapter, None)  # structural checks read the values too


def test_values_beyond_the_serving_dtype_are_refused(adapter: Path, spec: BaseModelSpec) -> None:
    with_value(adapter, Q_A, 1e6)
    assert validate_adapter_dir(adapter, spec).rank == 8  # the tiny base serves in float32
    half = dataclasses.replace(spec, serving_dtype="float16")
    with pytest.raises(
        AdapterValidationError, match=rf"tensor {re.escape(Q_A)} holds 1e\+06, beyond the range of float16"
    ):
        validate_adapter_dir(adapter, half)
    with_value(adapter, Q_A, 3.4e38)
    with pytest.raises(AdapterValidationError, match="beyond the range of bfloat16"):
        validate_adapter_dir(adapter, dataclasses.replace(spec, serving_dtype="bfloat16"))


def test_the_serving_dtype_is_the_gateways_or_the_models(tiny: Tiny, tmp_path: Path) -> None:
    assert BaseModelSpec.from_model_dir(tiny.base).serving_dtype == "float32"  # its config.json
    assert BaseModelSpec.from_model_dir(tiny.base, dtype="float16").serving_dtype == "float16"


def test_values_are_read_in_bounded_chunks(adapter: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters_manifest import tensor_values

    monkeypatch.setattr(tensor_values, "CHUNK_BYTES", 64)  # many chunks per tensor: the last one is bad
    edit_tensors({Q_A: np.concatenate([np.zeros((7, 128), np.float32), np.full((1, 128), np.nan, np.float32)])})(
        adapter
    )
    with pytest.raises(AdapterValidationError, match=f"tensor {re.escape(Q_A)} holds NaN"):
        validate_adapter_dir(adapter, spec)
