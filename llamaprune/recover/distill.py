"""Knowledge distillation from a teacher (the dense model) into the model being finetuned: the loss of one batch.

The loss is the KL divergence from the teacher's next-token distribution to the student's at a temperature T
(times T², so its gradients keep their scale whatever T), mixed with the next-token NLL (``weight`` is the KD's
share), plus an optional loss on the hidden states of the decoder layers the student kept (``hidden``). With
a 128k vocabulary one batch's logits are gigabytes, so neither model's are ever formed for the whole batch: both
models run their decoders, and the logits come from their heads chunk by chunk over the sequence positions, each
chunk checkpointed (recomputed in backward) so that autograd keeps only the hidden states. With ``top_k`` the
teacher's distribution is its top k tokens renormalized, taken once for the whole batch (k numbers a position)
and never recomputed. Positions whose label is ignored (padding, prompts) take no loss, as in the NLL.

    >>> settings = Distillation(teacher="smollm2-135m", temperature=2.0, top_k=64)
    >>> sums = batch_sums(student, Teacher(dense, settings), batch, device)       # doctest: +SKIP
    >>> (sums.objective / sums.tokens).backward()                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from llamaprune.core.errors import UsageError, flag
from llamaprune.io.loading import Device
from llamaprune.recover.data import IGNORE_INDEX

# Logit numbers of one chunk (positions x batch x vocabulary): 2**24 float32 are 64 MiB, and a chunk's forward
# holds a few such tensors at once.
CHUNK_ELEMENTS = 2**24
# The defaults of every command that distils (finetune, apply --finetune, prune --finetune). Half KD, half
# next-token loss: on SmolLM2 at 20% it recovered more than KD alone on both domains at both learning rates
# measured, and, unlike the next-token loss alone, it did not trade text of another domain away (bench/RESULTS.md,
# "Recovery after compensation").
DEFAULT_TEMPERATURE = 1.0
DEFAULT_WEIGHT = 0.5
SETTINGS = ("finetune --kd-temperature", "finetune --kd-weight", "finetune --kd-top-k", "finetune --kd-hidden",
            "finetune --teacher-device")


@dataclass(frozen=True)
class Distillation:
    """What ``finetune --teacher`` distils: ``teacher`` the model source as given (checkpoint directory, .gguf,
    hub id, smollm2-135m), ``weight`` the KD's share of the loss (the NLL gets the rest), ``top_k`` None for the
    whole vocabulary, ``hidden`` the weight of the hidden-state loss (0: none), ``device`` the teacher's (None:
    the student's)."""

    teacher: str
    temperature: float = DEFAULT_TEMPERATURE
    weight: float = DEFAULT_WEIGHT
    top_k: int | None = None
    hidden: float = 0.0
    device: Device | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            object.__setattr__(self, "device", Device(self.device))
        if not self.temperature > 0:
            raise UsageError(f"{flag('finetune --kd-temperature')} must be positive, got {self.temperature}")
        if not 0 <= self.weight <= 1:
            raise UsageError(f"{flag('finetune --kd-weight')} is the KD's share of the loss, in [0, 1]; got "
                             f"{self.weight}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"{flag('finetune --kd-top-k')} must be positive, got {self.top_k}")
        if not self.hidden >= 0:
            raise UsageError(f"{flag('finetune --kd-hidden')} is a weight, at least 0; got {self.hidden}")
        if self.weight == 0 and self.hidden == 0:
            raise UsageError(f"{flag('finetune --kd-weight')} 0 without {flag('finetune --kd-hidden')} leaves the "
                             f"teacher nothing to teach; give {flag('finetune --teacher')} none for the "
                             f"next-token loss alone")


def distillation(teacher: str | None, temperature: float = DEFAULT_TEMPERATURE, weight: float = DEFAULT_WEIGHT,
                 top_k: int | None = None, hidden: float = 0.0, device: Device | None = None) -> Distillation | None:
    """The settings of a command's KD flags: None where ``teacher`` is None or ``none`` (the next-token loss
    alone), which refuses KD settings other than the defaults, as they would do nothing."""
    if teacher is not None and teacher.strip().lower() != "none":
        return Distillation(teacher, temperature, weight, top_k, hidden, device)
    given = [name for name, value, default in zip(SETTINGS, (temperature, weight, top_k, hidden, device),
                                                  (DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, None, 0.0, None), strict=True)
             if value != default]
    if given:
        raise UsageError(f"{flag(given[0])} is a setting of distillation, which needs a teacher: give "
                         f"{flag('finetune --teacher')} MODEL (e.g. the model that was pruned)")
    return None


@dataclass(frozen=True)
class Teacher:
    """The teacher in memory (eval mode, never trained) with its settings; ``layers[i]`` is the teacher's layer
    that the student's decoder layer ``i`` was cut from (needed only for the hidden-state loss)."""

    model: object
    settings: Distillation
    layers: tuple[int, ...] = ()


@dataclass
class Sums:
    """One batch's losses summed over its predicted tokens: the training objective, the next-token NLL, the KL
    (already times T²) and the hidden-state loss, and the number of tokens."""

    objective: object
    nll: object
    kl: object
    hidden: object
    tokens: int


def causal_lm(model):
    """The transformers causal LM inside ``model`` (a PeftModel's base model, else ``model``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_logits(model, hidden):
    """The logits of ``hidden`` through the output head of the causal LM ``model``, soft-capped where its
    family caps them, as its own forward does."""
    import torch

    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def layer_outputs(model, indices: Sequence[int]) -> Iterator[dict[int, object]]:
    """Within the block, the output of each decoder layer in ``indices`` of the causal LM ``model`` as it runs
    (the hooks go at the end of the block, before a backward pass could recompute a checkpointed layer)."""
    captured: dict[int, object] = {}
    layers = model.get_decoder().layers

    def hook(index: int):
        def keep(module, args, output) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [layers[i].register_forward_hook(hook(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def chunk_positions(batch: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Sequence positions per chunk so that one chunk's logits hold about ``elements`` numbers."""
    return max(1, elements // max(1, batch * vocab))


def kl_sum(student_logits, teacher_logits, targets, temperature: float, top_k: int | None = None):
    """Σ over the positions whose target is not ignored of KL(teacher ‖ student) at ``temperature`` (not scaled by
    T²), in float32. ``teacher_logits`` are the teacher's logits, or with ``top_k`` a pair (values, indices) of
    its top k: its distribution is then those k tokens renormalized, and the student's full distribution is read
    at them (the KL between the two over the whole vocabulary, the teacher's being 0 outside its top k)."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if top_k is None:
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    else:
        values, indices = teacher_logits
        log_p = F.log_softmax(values.float() / temperature, dim=-1)
        log_q = log_q.gather(-1, indices)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return torch.where(targets != IGNORE_INDEX, kl, 0.0).sum()


def top_logits(teacher: Teacher, hidden, device, chunk: int) -> tuple[object, object]:
    """The teacher's top-k logits (values, indices) at every position of ``hidden`` (its final hidden states),
    computed a chunk at a time and moved to ``device``."""
    import torch

    model, k = teacher.model, teacher.settings.top_k
    values, indices = [], []
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for part in hidden.split(chunk, dim=1):
            top = head_logits(model, part).float().topk(k, dim=-1)
            values.append(top.values.to(device))
            indices.append(top.indices.to(device))
    return torch.cat(values, dim=1), torch.cat(indices, dim=1)


def _chunk_losses(student, teacher: Teacher | None, hidden, teacher_part, targets):
    """(KL sum, NLL sum) of one chunk of positions: ``hidden`` the student's final hidden states there,
    ``teacher_part`` the teacher's (its logits are made here, without gradients) or its top-k logits."""
    import torch
    import torch.nn.functional as F

    logits = head_logits(student, hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    settings = teacher.settings
    if settings.top_k is None:
        with torch.no_grad(), torch.autocast(teacher_part.device.type, enabled=False):
            teacher_part = head_logits(teacher.model, teacher_part).float().to(logits.device)
    return kl_sum(logits, teacher_part, targets, settings.temperature, settings.top_k), nll


def hidden_sum(student_states: Sequence, teacher_states: Sequence, mask):
    """Σ over the positions of ``mask`` of the mean over matched layers of ‖h_student − h_teacher‖² / ‖h_teacher‖²:
    each token's relative error, so the large activations of a few tokens do not drown the rest."""
    import torch

    total = 0.0
    for student, teacher in zip(student_states, teacher_states, strict=True):
        student = student[:, :-1].float()
        teacher = teacher[:, :-1].float().to(student.device)
        error = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
        total = total + torch.where(mask, error, 0.0).sum()
    return total / max(1, len(student_states))


def batch_sums(student, teacher: Teacher, batch: dict, device, chunk: int | None = None) -> Sums:
    """The distillation losses of one batch (``collate``'s input_ids, attention_mask, labels) for ``student``
    (a causal LM or a PeftModel around one), summed over its predicted tokens; ``chunk`` positions per chunk
    (default: ``chunk_positions``). Where gradients are on, each chunk is checkpointed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    settings, lm = teacher.settings, causal_lm(student)
    teacher_device = next(teacher.model.parameters()).device
    ids, mask, labels = (batch[key].to(device) for key in ("input_ids", "attention_mask", "labels"))
    matched = range(len(teacher.layers)) if settings.hidden else ()
    with layer_outputs(lm, matched) as student_states:
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    with (torch.no_grad(), torch.autocast(teacher_device.type, enabled=False),
          layer_outputs(teacher.model, [teacher.layers[i] for i in matched]) as teacher_states):
        teacher_hidden = teacher.model.get_decoder()(
            input_ids=ids.to(teacher_device), attention_mask=mask.to(teacher_device), use_cache=False
        ).last_hidden_state
    targets = labels[:, 1:]
    hidden, teacher_hidden = hidden[:, :-1], teacher_hidden[:, :-1]
    size = chunk or chunk_positions(hidden.shape[0], lm.config.vocab_size)
    teacher_parts = (top_logits(teacher, teacher_hidden, hidden.device, size) if settings.top_k
                     else (teacher_hidden,))
    kl = nll = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], size):
        part = slice(start, start + size)
        teacher_part = tuple(t[:, part] for t in teacher_parts)
        args = (lm, teacher, hidden[:, part], teacher_part if settings.top_k else teacher_part[0], targets[:, part])
        if torch.is_grad_enabled():
            chunk_kl, chunk_nll = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            chunk_kl, chunk_nll = _chunk_losses(*args)
        kl, nll = kl + chunk_kl, nll + chunk_nll
    kl = kl * settings.temperature**2
    keep = targets != IGNORE_INDEX
    states = hidden_sum([student_states[i] for i in matched], [teacher_states[teacher.layers[i]] for i in matched],
                        keep) if matched else kl.new_zeros(())
    objective = settings.weight * kl + (1 - settings.weight) * nll + settings.hidden * states
    return Sums(objective, nll, kl, states, int(keep.sum()))
