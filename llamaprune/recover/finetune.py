"""Recovery finetuning of a (pruned) model: LoRA through peft, or all weights, with the best weights kept.

``finetune`` trains a loaded model in memory on text windows or Alpaca-style instructions
(``llamaprune.recover.data``), checked against a held-out split, on the next-token loss or by distillation from a
teacher (``llamaprune.recover.distill``); ``merge_lora`` folds the adapters back into the weights. The
``llamaprune finetune`` command around it is ``llamaprune.recover.command``.

    >>> options = FinetuneOptions(method="lora", dataset="wikitext2", samples=1000, seq_len=256)
    >>> result = finetune(model, tokenizer, options)                                   # doctest: +SKIP
    >>> model = merge_lora(result.model)                                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum

from llamaprune.core.arch import LINEAR_NAMES
from llamaprune.core.choices import parse_choice
from llamaprune.core.errors import UsageError, flag
from llamaprune.io.loading import DType
from llamaprune.recover.data import (
    IGNORE_INDEX,
    build_examples,
    collate,
    pad_id,
    read_source,
    split_validation,
)
from llamaprune.recover.distill import Distillation, Teacher, batch_sums
from llamaprune.recover.teacher import load_teacher, own_tensors

log = logging.getLogger(__name__)

LORA_TARGETS = LINEAR_NAMES  # every linear of a decoder layer
MAX_GRAD_NORM = 1.0


class Method(str, Enum):
    lora = "lora"
    full = "full"


DEFAULT_LR = {Method.lora: 1e-4, Method.full: 1e-5}


@dataclass(frozen=True)
class FinetuneOptions:
    """What to train and how; ``lr`` None: the method's default, ``val_every`` None: about 10 checks, ``distill``
    None: the next-token loss alone."""

    method: Method = Method.lora
    dataset: str = "wikitext2"
    samples: int = 1000
    seq_len: int = 256
    epochs: int = 1
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    val_fraction: float = 0.05
    val_every: int | None = None
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = False
    seed: int = 0
    data_dir: str | None = None
    distill: Distillation | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_choice(Method, self.method, flag("finetune --method")))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _check_options(self)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr


def parse_targets(spec: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ("q_proj", "v_proj")."""
    return tuple(name.strip() for name in spec.split(",") if name.strip())


def _check_options(o: FinetuneOptions) -> None:
    positive = {
        "--samples": o.samples,
        "--epochs": o.epochs,
        "--batch-size": o.batch_size,
        "--grad-accum": o.grad_accum,
        "--lora-r": o.lora_r,
        "--lora-alpha": o.lora_alpha,
        "--lr": o.learning_rate,
        "--val-every": 1 if o.val_every is None else o.val_every,
    }
    for name, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag('finetune ' + name)} must be positive, got {value}")
    if o.seq_len < 2:
        raise UsageError(
            f"{flag('finetune --seq-len')} must be at least 2 (one token predicts the next), got {o.seq_len}"
        )
    if not 0 <= o.lora_dropout < 1:
        raise UsageError(f"{flag('finetune --lora-dropout')} must be in [0, 1), got {o.lora_dropout}")
    if not 0 < o.val_fraction < 1:
        raise UsageError(f"the validation fraction must be in (0, 1), got {o.val_fraction}")
    if not 0 <= o.warmup_ratio < 1:
        raise UsageError(f"the warmup ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.method is Method.lora and not o.lora_targets:
        raise UsageError(
            f"{flag('finetune --lora-targets')} is empty; name the linear layers to adapt, e.g. "
            f"{','.join(LORA_TARGETS)}"
        )


@dataclass
class FinetuneResult:
    """The trained model (LoRA: the unmerged PeftModel, see ``merge_lora``) and how training went."""

    model: object
    curve: dict = field(repr=False)
    train_examples: int
    validation_examples: int
    steps: int
    tokens: int
    seconds: float

    @property
    def best(self) -> dict:
        return self.curve["best"]

    def summary(self) -> dict:
        return {
            "train_examples": self.train_examples,
            "validation_examples": self.validation_examples,
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": self.curve["tokens_per_s"],
            "best_step": self.best["step"],
            "best_validation_loss": self.best["loss"],
        }


def token_nll(logits, labels):
    """(summed next-token NLL in float32, number of predicted tokens): labels -100 take no loss."""
    from llamaprune.evaluate.perplexity import shifted_nll

    nll, targets = shifted_nll(logits, labels, "sum")
    return nll, int((targets != IGNORE_INDEX).sum())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_targets(model, targets: tuple[str, ...]) -> None:
    """Every target must name some linear layer (a skipped sub-block simply has none of its own)."""
    from torch import nn

    present = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    unknown = [t for t in targets if t not in present]
    if unknown:
        raise UsageError(
            f"--lora-targets {','.join(unknown)} match no linear layer of this model; "
            f"choose from {','.join(sorted(present))}"
        )


def prepare(model, options: FinetuneOptions):
    """The model to train: LoRA-wrapped (only adapters trainable) or with every weight trainable."""
    if options.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if options.method is Method.full:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    check_targets(model, options.lora_targets)
    if options.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need an input grad
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.lora_targets),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5.24 for a deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model):
    """Fold LoRA adapters into the base weights; any other model is returned as it is."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_state(model) -> dict:
    """A CPU copy of the trainable weights: the best weights so far."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def restore_state(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])


def batches_of(examples: list, batch_size: int, pad_token_id: int) -> list[dict]:
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def batch_nll(model, batch: dict, device):
    with autocast(device):
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits
    return token_nll(logits, batch["labels"].to(device))


def batch_losses(model, batch: dict, device, teacher: Teacher | None = None):
    """(the training objective, the next-token NLL) of one batch, each summed over its predicted tokens: the
    NLL alone, or with a ``teacher`` the distillation objective (``recover.distill``)."""
    if teacher is None:
        nll, _ = batch_nll(model, batch, device)
        return nll, nll
    with autocast(device):
        sums = batch_sums(model, teacher, batch, device)
    return sums.objective, sums.nll


def validation_loss(model, batches: list[dict], device, teacher: Teacher | None = None) -> tuple[float, float]:
    """(mean objective, mean next-token NLL) per predicted token over the validation batches, in eval mode (no
    dropout)."""
    import torch

    model.eval()
    total, nll_total, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            objective, nll = batch_losses(model, batch, device, teacher)
            total, nll_total = total + objective.item(), nll_total + nll.item()
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1), nll_total / max(count, 1)


def optimizer_step(model, group: list[dict], params: list, optimizer, device,
                   teacher: Teacher | None = None) -> tuple[float, float]:
    """One step over the ``group`` of batches (gradient accumulation); returns its mean token objective and
    next-token NLL (the same without a ``teacher``).

    Each batch's summed loss is divided by the tokens of the whole group, so the gradient is the one of
    the token mean over the group, however the tokens fall into batches.
    """
    import torch

    targets = max(1, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group))
    total, nll_total = 0.0, 0.0
    for batch in group:
        objective, nll = batch_losses(model, batch, device, teacher)
        (objective / targets).backward()
        total, nll_total = total + objective.item(), nll_total + nll.item()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / targets, nll_total / targets


def finetune(model, tokenizer, options: FinetuneOptions, examples: list | None = None, progress: bool = True,
             teacher: Teacher | None = None):
    """Train ``model`` on ``examples`` (default: read from ``options.dataset``); returns a FinetuneResult.

    A seeded validation split is scored before training, every ``val_every`` optimizer steps and at the end;
    the weights with the lowest validation loss (the training objective: with ``options.distill``, the
    distillation loss from ``teacher``, loaded from its settings where not given) are the ones returned.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(options.seed)
    if examples is None:
        examples = build_examples(
            tokenizer,
            read_source(options.dataset, options.data_dir),
            options.samples,
            options.seq_len,
            options.seed,
        )
    train, held_out = split_validation(examples, options.val_fraction, options.batch_size, options.seed)
    pad = pad_id(tokenizer)
    validation = batches_of(held_out, options.batch_size, pad)
    device = next(model.parameters()).device
    if options.distill is not None and teacher is None:
        teacher = load_teacher(options.distill, model, None, DType(str(model.dtype).removeprefix("torch.")))
    if teacher is not None and options.method is Method.full:
        own_tensors(model, teacher.model)
    model = prepare(model, options)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(math.ceil(len(train) / options.batch_size) / options.grad_accum)
    total = steps_per_epoch * options.epochs
    val_every = options.val_every or max(1, total // 10)
    warmup = max(1, round(options.warmup_ratio * total))
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    log.info(
        "finetuning (%s, lr %g) on %d examples, %d held out: %d steps of %d x %d, %d trainable parameters",
        options.method.value,
        options.learning_rate,
        len(train),
        len(held_out),
        total,
        options.batch_size,
        options.grad_accum,
        sum(p.numel() for p in params),
    )
    if teacher is not None:
        kd = teacher.settings
        log.info("distilling from %s: KL at temperature %g over %s, weight %g (next-token loss %g), hidden-state "
                 "loss %g on %d matched layers", kd.teacher, kd.temperature,
                 f"the top {kd.top_k} tokens" if kd.top_k else "the vocabulary", kd.weight, 1 - kd.weight, kd.hidden,
                 len(teacher.layers))
    curve = {"train": [], "validation": [], "best": None, "tokens_per_s": None}
    best_state = None

    def validate(step: int) -> None:
        nonlocal best_state
        loss, nll = validation_loss(model, validation, device, teacher)
        curve["validation"].append({"step": step, "loss": loss, **({"lm_loss": nll} if teacher else {})})
        if curve["best"] is None or loss < curve["best"]["loss"]:
            curve["best"], best_state = {"step": step, "loss": loss}, trainable_state(model)
        log.info(
            "step %d: validation loss %.4f (best %.4f at step %d)",
            step,
            loss,
            curve["best"]["loss"],
            curve["best"]["step"],
        )

    validate(0)
    step, tokens, seconds = 0, 0, 0.0
    bar = tqdm(total=total, desc=f"finetune {options.method.value}", unit="step", disable=not progress)
    for epoch in range(options.epochs):
        order = list(train)
        random.Random(options.seed + epoch).shuffle(order)
        batches = batches_of(order, options.batch_size, pad)
        for first in range(0, len(batches), options.grad_accum):
            group = batches[first : first + options.grad_accum]
            start = time.perf_counter()
            loss, nll = optimizer_step(model, group, params, optimizer, device, teacher)
            scheduler.step()
            seconds += time.perf_counter() - start
            step += 1
            tokens += sum(int(b["attention_mask"].sum()) for b in group)
            curve["train"].append({"step": step, "loss": loss, **({"lm_loss": nll} if teacher else {}),
                                   "tokens": tokens, "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
            if step % val_every == 0 or step == total:
                validate(step)
    bar.close()
    curve["tokens_per_s"] = tokens / seconds if seconds > 0 else None
    if curve["best"]["step"] != step:
        log.info("restoring the best weights (step %d)", curve["best"]["step"])
        restore_state(model, best_state)
    _finish(model, options)
    return FinetuneResult(model, curve, len(train), len(held_out), step, tokens, seconds)


def _finish(model, options: FinetuneOptions) -> None:
    """Back to an inference model: eval mode, no checkpointing, nothing left requiring grad."""
    base = model.get_base_model() if options.method is Method.lora else model
    if options.gradient_checkpointing:
        base.activation_checkpointing_disable()
        if options.method is Method.lora:
            base.disable_input_require_grads()
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()

