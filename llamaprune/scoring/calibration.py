"""The calibration pass of scoring: which parameters are scored, the hooks that fold every batch into running
accumulators, and the loop over the batches.

Forward pre-hooks fold layer inputs named in ``llamaprune.core.arch`` (attn_in, o_in, mlp_in, down_in) into the
per-feature statistics (``INPUT_STATISTICS``) that something reads there (the requested criteria, and bias
compensation: ``RECORDED_STATISTICS``), and forward hooks the layer in/out cosines (block influence); when
a criterion needs gradients, each batch's loss is backpropagated and a post-accumulate-grad hook folds each
prunable parameter's gradient into running sums and frees it (docs/ARTIFACTS.md, "Criteria").

Gradients are folded per group of windows (``GradientGroup``), not per batch: the Fisher term squares a group's
gradient, so the grouping is fixed (``fisher_windows``) and --batch-size only splits a group into batches whose
gradients add up in ``.grad`` until the group ends. Each batch's mean loss is weighted by its share of a full
group, so a group's gradient is that of its summed token loss over a full group's tokens, whatever the batches.

    >>> shape = model_shape(model.config)                                           # doctest: +SKIP
    >>> specs = param_specs(model, shape)                                           # doctest: +SKIP
    >>> acc = calibrate(model, batches, shape, specs, {"attn_in": ("sq_norm",)}, gradients=False)  # doctest: +SKIP
    >>> acc.inputs[(0, "attn_in", "sq_norm")].shape == (model.config.hidden_size,)  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from llamaprune.core.arch import INPUT_READERS, LINEARS, ROWS
from llamaprune.core.criteria import OUTPUT_INPUTS
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.groups import LayerShape, ModelShape
from llamaprune.io.text_data import batches
from llamaprune.scoring.accumulators import Accumulators, ParamSpec
from llamaprune.scoring.importance.fluctuation import accumulate_sum
from llamaprune.scoring.importance.influence import accumulate_cosine
from llamaprune.scoring.importance.obs import accumulate_gram, accumulate_out_grad_sq
from llamaprune.scoring.importance.taylor import fold_gradient, new_state
from llamaprune.scoring.importance.wanda import accumulate_sq_norm

# Per-feature statistics of a linear's input: name -> fold(x, running value or None) -> running value, x flat
# (tokens, features). A criterion asks for them by name on the inputs it reads (llamaprune.core.criteria);
# stats.safetensors holds them as ``layers.<layer>.<input>.<name>``.
INPUT_STATISTICS = {"sq_norm": accumulate_sq_norm, "sum": accumulate_sum, "gram": accumulate_gram}
# Statistics of the loss gradient at the output of the linear that reads an input, folded (grad, running value or
# None) by a hook on the output tensor in passes with a backward, and named by that input like the others.
OUTPUT_GRADIENT_STATISTICS = {"out_grad_sq": accumulate_out_grad_sq}
# Statistics read by their formula at the end of the pass and not written to stats.safetensors: a Gram matrix is
# (features + 1)^2 float64 numbers per layer, far more than the checkpoint's own projection.
TRANSIENT_STATISTICS = frozenset({"gram"})
# Input name -> statistics folded on every pass, whatever the criteria, so stats.safetensors always has them
# (docs/ARTIFACTS.md): the sums of the output projections' inputs (o_in, down_in), whose means
# ``apply --compensate bias`` reads (llamaprune.apply.refit.mean_biases), so any run's plans can be compensated.
RECORDED_STATISTICS: dict[str, tuple[str, ...]] = {name: ("sum",) for name in OUTPUT_INPUTS}
# What a pass folds on each input: input name -> statistic names (``scoring.in_memory.statistics_of``).
Statistics = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class GradientGroup:
    """Windows whose gradients are summed before they are folded, run as ``batches``; ``full``: the windows of a
    full group (each batch's mean loss is weighted by its windows / ``full``)."""

    batches: tuple[torch.Tensor, ...]
    full: float


def gradient_groups(windows: torch.Tensor, fisher_windows: int, batch_size: int) -> list[GradientGroup]:
    """(n, L) windows in groups of ``fisher_windows`` (the last may be smaller), each split into batches of at
    most ``batch_size`` that never cross a group's boundary."""
    return [GradientGroup(tuple(batches(group, batch_size)), fisher_windows) for group in windows.split(fisher_windows)]


@dataclass
class _Gate:
    """Whether the gradient hooks fold ``.grad`` now (a group's last batch) or leave it to accumulate; and
    ``loss_scale``, the factor from the gradient of the batch's weighted mean loss to that of its summed token loss
    (what output-gradient statistics fold, so that they do not depend on how windows are batched or sharded)."""

    open: bool = True
    loss_scale: float = 1.0


def param_specs(model, shape: ModelShape) -> list[ParamSpec]:
    """Every prunable weight and bias of the decoder layers, layer by layer in the order of the layer table."""
    layers = model.base_model.layers
    return [spec for i, layer_shape in enumerate(shape.layers) for spec in layer_param_specs(layers[i], i, layer_shape)]


def layer_param_specs(block, layer: int, layer_shape: LayerShape) -> list[ParamSpec]:
    """The prunable weights and biases of decoder block ``block`` (layer ``layer``): per block, so a layer-streamed
    pass can score a layer while only its weights are loaded."""
    specs = []
    for linear in LINEARS:
        groups = layer_shape.groups(linear.kind)
        if not groups:
            continue
        module = block.get_submodule(linear.path)
        specs.append(ParamSpec(f"layers.{layer}.{linear.path}.weight", module.weight, layer, linear, groups))
        if module.bias is not None and linear.axis == ROWS:  # an output bias of o/down belongs to no group
            specs.append(ParamSpec(f"layers.{layer}.{linear.path}.bias", module.bias, layer, linear, groups))
    return specs


def layer_hooks(block, layer: int, layer_shape: LayerShape, acc: Accumulators, statistics: Statistics,
                gate: _Gate | None = None) -> list:
    """Forward hooks of one decoder block: its linears' inputs folded into the ``statistics`` wanted on each (an
    input without any gets no hook) and its input/output cosines (block influence), into ``acc``; returns their
    handles. Per block, so that the whole-model pass and the layer-streamed one (``llamaprune.scoring.streamed``)
    fold the same tensors the same way."""

    def input_hook(key: str, names: tuple[str, ...]):
        folds = [((layer, key, name), INPUT_STATISTICS[name]) for name in names if name in INPUT_STATISTICS]

        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # once for all the statistics
            for slot, fold in folds:
                acc.inputs[slot] = fold(x, acc.inputs.get(slot))

        return hook

    def output_gradient_hook(key: str, names: tuple[str, ...]):
        folds = [((layer, key, name), OUTPUT_GRADIENT_STATISTICS[name]) for name in names]

        def fold(grad):
            grad = grad.reshape(-1, grad.shape[-1]) * gate.loss_scale
            for slot, function in folds:
                acc.inputs[slot] = function(grad, acc.inputs.get(slot))

        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(fold)

        return hook

    def influence_hook(module, args, kwargs, output):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        acc.cosines[layer] = accumulate_cosine(x_in, x_out, acc.cosines.get(layer))

    gate = gate or _Gate()
    handles = [block.register_forward_hook(influence_hook, with_kwargs=True)]
    for key, linear in INPUT_READERS.items():
        names = statistics.get(key, ())
        if not names or not layer_shape.groups(linear.kind):
            continue
        module = block.get_submodule(linear.path)
        if any(name in INPUT_STATISTICS for name in names):
            handles.append(module.register_forward_pre_hook(input_hook(key, names)))
        gradient_names = tuple(name for name in names if name in OUTPUT_GRADIENT_STATISTICS)
        if gradient_names:
            handles.append(module.register_forward_hook(output_gradient_hook(key, gradient_names)))
    return handles


def install_hooks(model, shape: ModelShape, specs: list[ParamSpec], acc: Accumulators, statistics: Statistics,
                  gradients: bool, gate: _Gate | None = None, accumulate: torch.dtype = torch.float32) -> list:
    """Hooks that route every batch's tensors into ``acc`` (gradients only while ``gate`` is open, w*G summed in
    ``accumulate``); returns their handles."""
    gate = gate or _Gate()
    layers = model.base_model.layers
    handles = [handle for i, layer_shape in enumerate(shape.layers)
               for handle in layer_hooks(layers[i], i, layer_shape, acc, statistics, gate)]

    if gradients:
        for spec in specs:
            acc.gradients[spec.name] = new_state(spec.param, spec.num_groups, accumulate)

            def grad_hook(param, spec=spec):
                if gate.open:
                    fold_gradient(param, param.grad, acc.gradients[spec.name], spec.axis, spec.num_groups)
                    param.grad = None

            handles.append(spec.param.register_post_accumulate_grad_hook(grad_hook))
    return handles


def calibrate(model, groups: Iterable[GradientGroup | torch.Tensor], shape: ModelShape, specs: list[ParamSpec],
              statistics: Statistics, gradients: bool, progress: bool = False,
              accumulate: torch.dtype = torch.float32, sharded=None) -> Accumulators:
    """Run ``groups`` (``GradientGroup``s, or (B, L) LongTensors of token ids, each a group of its own) through
    ``model`` once, with a backward pass when ``gradients``; the model's mode, requires_grad flags and .grad
    are restored afterwards. ``sharded`` (a ``scoring.sharded.ShardedGradients``, for an FSDP model) folds the
    gradient shards after each group instead of the per-parameter hooks."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    acc = Accumulators()
    saved_requires_grad = {p: p.requires_grad for p in model.parameters()}
    prunable = {id(s.param) for s in specs}
    for p in model.parameters():
        p.requires_grad_(gradients and id(p) in prunable)
    gate = _Gate()
    handles = install_hooks(model, shape, specs, acc, statistics, gradients and sharded is None, gate, accumulate)
    if gradients and sharded is not None:
        acc.gradients.update(sharded.states(accumulate))
    was_training = model.training
    model.eval()
    try:
        for step, group in enumerate(tqdm(groups, desc="score", unit="group", disable=not progress)):
            if not isinstance(group, GradientGroup):
                group = GradientGroup((group,), len(group))
            for i, batch in enumerate(group.batches):
                gate.open = i == len(group.batches) - 1
                _run_batch(model, batch.to(device), acc, gradients, len(batch) / group.full, step, gate)
            if gradients and sharded is not None:
                sharded.fold(acc)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_requires_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return acc


def _run_batch(model, batch: torch.Tensor, acc: Accumulators, gradients: bool, weight: float, step: int,
               gate: _Gate) -> None:
    """One forward pass (and backward, its mean loss over its predicted tokens times ``weight``: the batch's share
    of a full group)."""
    acc.tokens += batch.numel()
    if not gradients:
        with torch.no_grad():
            model.base_model(input_ids=batch, use_cache=False)
        return
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    if not torch.isfinite(loss):
        raise UsageError(
            f"calibration loss is {loss.item()} in group {step}; score in float32 (--dtype float32) or with a "
            f"smaller {flag('score --batch-size')}"
        )
    gate.loss_scale = batch.shape[0] * (batch.shape[1] - 1) / weight
    (loss if weight == 1 else loss * weight).backward()
