"""PEFT LoRA training on a causal LM: the loss only on completion (assistant) tokens, seeded.

The adapter it writes is checked with the gateway's own validation before it is reported done,
so what trains here is what the gateway serves.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_training.dataset import TokenizedExample, read_examples, tokenize
from adapters_manifest.record import ADAPTER_FILES
from adapters_manifest.validation import BaseModelSpec, validate_adapter_dir

IGNORE_INDEX = -100  # labels the loss skips: prompt and padding tokens
# Files a previous training run leaves in the output folder (PEFT writes a model card too).
OUTPUT_FILES = (*ADAPTER_FILES, "README.md")
# The modules a LoRA may never target here: the gateway serves embeddings and the head unchanged.
NOT_TARGETS = ("embed_tokens", "lm_head")


class TrainingError(ValueError):
    """Options the trainer refuses (bad target modules, rank, output folder); the message says why."""


@dataclass(frozen=True)
class TrainingOptions:
    rank: int = 8
    alpha: float | None = None  # default: 2 * rank
    target_modules: tuple[str, ...] = ()  # default: every linear layer of the decoder blocks
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class TrainingResult:
    out: Path
    examples: int  # training sequences (a chat line gives one per assistant message)
    target_tokens: int
    epoch_losses: list[float] = field(default_factory=list)  # mean loss per target token, per epoch
    seconds: float = 0.0


def train_adapter(
    data: Path, base: Path, out: Path, options: TrainingOptions = TrainingOptions(), progress: bool = True
) -> TrainingResult:
    """Train a LoRA on `data` over the model in `base`; write it to `out` (safetensors)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # one progress bar: the training's
    started = time.monotonic()
    _check_options(options)
    _check_output_folder(out)
    spec = BaseModelSpec.from_model_dir(base)
    targets = _target_modules(spec, options.target_modules)
    examples = read_examples(data)  # the data first: a bad line fails before a model is loaded
    tokenizer = AutoTokenizer.from_pretrained(base)
    context = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None) or tokenizer.model_max_length
    sequences = tokenize(data, examples, tokenizer, context)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(options.seed)  # the LoRA A matrices' initialisation and the batch order
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha if options.alpha is not None else 2 * options.rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=options.lr)
    order = torch.Generator().manual_seed(options.seed)
    steps_per_epoch = math.ceil(len(sequences) / options.batch_size)
    epoch_losses = []
    with tqdm(
        total=options.epochs * steps_per_epoch, desc="training", unit="step", file=sys.stderr, disable=not progress
    ) as bar:
        for _ in range(options.epochs):
            loss_sum, token_count = 0.0, 0
            permutation = torch.randperm(len(sequences), generator=order).tolist()
            for start in range(0, len(sequences), options.batch_size):
                batch = [sequences[i] for i in permutation[start : start + options.batch_size]]
                input_ids, labels, attention = _collate(batch, pad_id)
                logits = peft_model(input_ids=input_ids, attention_mask=attention).logits
                # Position t predicts token t+1; the mean runs over this batch's target tokens.
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                targets_in_batch = sum(len(s.target_ids) for s in batch)
                loss_sum += loss.item() * targets_in_batch
                token_count += targets_in_batch
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
            epoch_losses.append(loss_sum / token_count)

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    validate_adapter_dir(out, spec)  # the gateway's own checks: never report an adapter it would refuse
    return TrainingResult(
        out=out,
        examples=len(sequences),
        target_tokens=sum(len(s.target_ids) for s in sequences),
        epoch_losses=epoch_losses,
        seconds=time.monotonic() - started,
    )


def _collate(batch: list[TokenizedExample], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded input ids, labels (IGNORE_INDEX outside the targets) and the attention mask."""
    import torch

    width = max(s.length for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sequence in enumerate(batch):
        ids = sequence.prompt_ids + sequence.target_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(sequence.prompt_ids) : len(ids)] = torch.tensor(sequence.target_ids)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def _check_options(options: TrainingOptions) -> None:
    if options.rank < 1:
        raise TrainingError(f"--rank must be at least 1, got {options.rank}")
    if options.epochs < 1:
        raise TrainingError(f"--epochs must be at least 1, got {options.epochs}")
    if options.batch_size < 1:
        raise TrainingError(f"--batch-size must be at least 1, got {options.batch_size}")
    if not (math.isfinite(options.lr) and options.lr > 0):
        raise TrainingError(f"--lr must be a positive number, got {options.lr}")


def _check_output_folder(out: Path) -> None:
    """An adapter folder must hold exactly the adapter: refuse to mix it with other files."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES) if out.is_dir() else []
    if others:
        raise TrainingError(f"--out {out} holds other files ({', '.join(others[:5])}); use an empty folder")


def _target_modules(spec: BaseModelSpec, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested module names, each checked against the base; by default every linear layer
    inside the decoder blocks (PEFT's "all-linear"), spelled out so the config lists them."""
    leaves = sorted({path.rsplit(".", 1)[-1] for path in spec.module_shapes} - set(NOT_TARGETS))
    if not requested:
        return tuple(leaves)
    for target in requested:
        if target in NOT_TARGETS or target not in leaves:
            raise TrainingError(
                f"target module {target!r} is not a linear layer of the base (choose from: {', '.join(leaves)})"
            )
    return tuple(sorted(set(requested)))
