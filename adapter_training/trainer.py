"""PEFT LoRA training on a causal LM: the loss only on completion (assistant) tokens, seeded.

Without `epochs` the length comes from the data: at least AUTO_EPOCHS passes and AUTO_MIN_STEPS
optimiser steps (a dozen examples need hundreds of steps, a large set a few passes), stopping
early once an epoch predicts every target token (greedy decoding then reproduces the data).
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
AUTO_EPOCHS = 3
AUTO_MIN_STEPS = 500
# Still learning: the last quarter of the epochs brought more than this share of the loss's whole fall.
STILL_LEARNING = 0.05
# Stalled: training stopped improving before the loss fell by this share of its first epoch's.
STALLED = 0.25


class TrainingError(ValueError):
    """Options the trainer refuses (bad target modules, rank, output folder); the message says why."""


@dataclass(frozen=True)
class TrainingOptions:
    rank: int = 8
    alpha: float | None = None  # default: 2 * rank
    target_modules: tuple[str, ...] = ()  # default: every linear layer of the decoder blocks
    epochs: int | None = None  # default: from the data (see the module's docstring)
    lr: float = 2e-3
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Scores:
    loss: float  # mean cross-entropy per target token
    accuracy: float  # share of target tokens that are the model's top prediction (teacher forcing)


@dataclass(frozen=True)
class TrainingResult:
    out: Path
    examples: int  # training sequences (a chat line gives one per assistant message)
    target_tokens: int
    epochs: list[Scores] = field(default_factory=list)  # per epoch, measured on each batch before its step
    steps: int = 0
    seconds: float = 0.0
    held_out: Scores | None = None  # on the `eval_data` set, after training

    @property
    def epoch_losses(self) -> list[float]:
        return [e.loss for e in self.epochs]

    @property
    def memorised(self) -> bool:
        return self.epochs[-1].accuracy == 1.0

    def convergence_warning(self) -> str | None:
        """Why the adapter may not have learned its data, naming the option to change; None when it did."""
        if self.memorised:
            return None
        if len(self.epochs) < 2:
            return "one epoch only: the adapter may not have converged; train longer with --epochs"
        losses = self.epoch_losses
        first, last = losses[0], losses[-1]
        if not math.isfinite(last) or last >= first:
            return f"the loss did not fall ({first:.3f} -> {last:.3f}): lower --lr"
        window = max(1, len(losses) // 4)
        before = losses[-1 - window]
        if before - last > STILL_LEARNING * (first - last):
            span = "epoch" if window == 1 else f"{window} epochs"
            return (
                f"the loss was still falling in the last {span} ({before:.3f} -> {last:.3f}) and "
                f"{self.epochs[-1].accuracy:.0%} of the target tokens are predicted: the adapter has not "
                f"converged; train longer with --epochs {2 * len(losses)}"
            )
        if first - last < STALLED * first:
            return (
                f"the loss stalled at {last:.3f} (from {first:.3f}) with {self.epochs[-1].accuracy:.0%} of the "
                "target tokens predicted: the adapter learned little; lower --lr"
            )
        return None


def train_adapter(
    data: Path,
    base: Path,
    out: Path,
    options: TrainingOptions = TrainingOptions(),
    progress: bool = True,
    eval_data: Path | None = None,
) -> TrainingResult:
    """Train a LoRA on `data` over the model in `base`; write it to `out` (safetensors). With
    `eval_data`, the finished adapter's loss and accuracy on that held-out set are reported too."""
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
    held_out_examples = read_examples(eval_data) if eval_data is not None else []
    tokenizer = AutoTokenizer.from_pretrained(base)
    context = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None) or tokenizer.model_max_length
    sequences = tokenize(data, examples, tokenizer, context)
    held_out = tokenize(eval_data, held_out_examples, tokenizer, context) if eval_data is not None else []
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
    auto = options.epochs is None
    max_epochs = options.epochs or max(AUTO_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps_per_epoch))
    epochs: list[Scores] = []
    desc = "training (stops once learned)" if auto else "training"
    with tqdm(total=max_epochs * steps_per_epoch, desc=desc, unit="step", file=sys.stderr, disable=not progress) as bar:
        while len(epochs) < max_epochs:
            tally = _Tally()
            permutation = torch.randperm(len(sequences), generator=order).tolist()
            for start in range(0, len(sequences), options.batch_size):
                batch = [sequences[i] for i in permutation[start : start + options.batch_size]]
                loss = tally.add(peft_model, batch, pad_id)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
            epochs.append(tally.scores())
            if auto and epochs[-1].accuracy == 1.0:  # every target token predicted: nothing left to learn
                bar.total = bar.n
                break

    peft_model.eval()
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    validate_adapter_dir(out, spec)  # the gateway's own checks: never report an adapter it would refuse
    return TrainingResult(
        out=out,
        examples=len(sequences),
        target_tokens=sum(len(s.target_ids) for s in sequences),
        epochs=epochs,
        steps=len(epochs) * steps_per_epoch,
        seconds=time.monotonic() - started,
        held_out=_evaluate(peft_model, held_out, options.batch_size, pad_id) if held_out else None,
    )


class _Tally:
    """Loss and top-1 accuracy over the target tokens of the batches seen so far."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.tokens = 0.0, 0, 0

    def add(self, model: Any, batch: list[TokenizedExample], pad_id: int) -> Any:
        """The batch's mean loss (a tensor, for backward) after counting it."""
        import torch

        input_ids, labels, attention = _collate(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        labels = labels[:, 1:]  # position t predicts token t+1
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        counted = labels != IGNORE_INDEX
        tokens = int(counted.sum())
        self.loss_sum += loss.item() * tokens
        self.correct += int((logits.argmax(-1)[counted] == labels[counted]).sum())
        self.tokens += tokens
        return loss

    def scores(self) -> Scores:
        return Scores(loss=self.loss_sum / self.tokens, accuracy=self.correct / self.tokens)


def evaluate(data: Path, base: Path, adapter: Path | None = None, batch_size: int = 8) -> Scores:
    """Loss and accuracy on `data` of the base model, or of the base with `adapter` on it."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    context = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None) or tokenizer.model_max_length
    sequences = tokenize(data, read_examples(data), tokenizer, context)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _evaluate(model.eval(), sequences, batch_size, pad_id)


def _evaluate(model: Any, sequences: list[TokenizedExample], batch_size: int, pad_id: int) -> Scores:
    import torch

    tally = _Tally()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            tally.add(model, sequences[start : start + batch_size], pad_id)
    return tally.scores()


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
    if options.epochs is not None and options.epochs < 1:
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
