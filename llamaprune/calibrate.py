"""The calibration pass of scoring: which parameters are scored, the hooks that fold every batch into running
accumulators, and the loop over the batches.

Forward pre-hooks fold each layer input named in ``llamaprune.arch`` (attn_in, o_in, mlp_in, down_in) into
per-feature statistics (``INPUT_STATISTICS``) and forward hooks the layer in/out cosines (block influence); when
a criterion needs gradients, each batch's loss is backpropagated and a post-accumulate-grad hook folds each
prunable parameter's gradient into running sums and frees it at once (docs/ARTIFACTS.md, "Criteria").

    >>> shape = model_shape(model.config)                                           # doctest: +SKIP
    >>> specs = param_specs(model, shape)                                           # doctest: +SKIP
    >>> acc = calibrate(model, batches, shape, specs, ("sq_norm",), gradients=False)  # doctest: +SKIP
    >>> acc.inputs[(0, "attn_in", "sq_norm")].shape == (model.config.hidden_size,)  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamaprune.arch import INPUT_READERS, LINEARS, ROWS, Linear
from llamaprune.errors import UsageError
from llamaprune.groups import ModelShape
from llamaprune.importance.fluctuation import accumulate_sum
from llamaprune.importance.influence import accumulate_cosine
from llamaprune.importance.taylor import GradientState, fold_gradient, new_state
from llamaprune.importance.wanda import accumulate_sq_norm

# Per-feature statistics of a linear's input: name -> fold(x, running value or None) -> running value.
# A criterion asks for them by name (llamaprune.criteria); stats.safetensors holds them as
# ``layers.<layer>.<input>.<name>``.
INPUT_STATISTICS = {"sq_norm": accumulate_sq_norm, "sum": accumulate_sum}
# Collected on every pass, whatever the criteria: stats.safetensors always has them (docs/ARTIFACTS.md); the sums
# give the input means that bias compensation needs (llamaprune.compensate).
RECORDED_STATISTICS = ("sq_norm", "sum")


@dataclass(frozen=True)
class ParamSpec:
    """A prunable weight or bias of one layer, with the module (``linear``) it belongs to."""

    name: str
    param: torch.nn.Parameter
    layer: int
    linear: Linear
    num_groups: int

    @property
    def kind(self) -> str:
        return self.linear.kind

    @property
    def axis(self) -> str:
        return self.linear.axis

    @property
    def input(self) -> str:
        return self.linear.input

    @property
    def is_bias(self) -> bool:
        return self.param.dim() == 1


@dataclass
class Accumulators:
    """Everything the hooks fold batches into. Each entry adds up over shards of calibration data (a gradient
    state keeps the summed w*G itself: |w*G| is taken only when the scores are made)."""

    inputs: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)  # (layer, input, statistic)
    cosines: dict[int, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, GradientState] = field(default_factory=dict)  # by ParamSpec.name
    tokens: int = 0


def param_specs(model, shape: ModelShape) -> list[ParamSpec]:
    """Every prunable weight and bias of the decoder layers, layer by layer in the order of the layer table."""
    specs = []
    layers = model.base_model.layers
    for i, layer_shape in enumerate(shape.layers):
        for linear in LINEARS:
            groups = layer_shape.groups(linear.kind)
            if not groups:
                continue
            module = layers[i].get_submodule(linear.path)
            specs.append(ParamSpec(f"layers.{i}.{linear.path}.weight", module.weight, i, linear, groups))
            if module.bias is not None and linear.axis == ROWS:  # an output bias of o/down belongs to no group
                specs.append(ParamSpec(f"layers.{i}.{linear.path}.bias", module.bias, i, linear, groups))
    return specs


def install_hooks(model, shape: ModelShape, specs: list[ParamSpec], acc: Accumulators, statistics: tuple[str, ...],
                  gradients: bool) -> list:
    """Hooks that route every batch's tensors into ``acc``; returns their handles."""
    handles = []
    layers = model.base_model.layers

    def input_hook(layer: int, key: str):
        def hook(module, args):
            for name in statistics:
                slot = (layer, key, name)
                acc.inputs[slot] = INPUT_STATISTICS[name](args[0], acc.inputs.get(slot))

        return hook

    def influence_hook(layer: int):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            acc.cosines[layer] = accumulate_cosine(x_in, x_out, acc.cosines.get(layer))

        return hook

    for i, layer_shape in enumerate(shape.layers):
        block = layers[i]
        handles.append(block.register_forward_hook(influence_hook(i), with_kwargs=True))
        for key, linear in INPUT_READERS.items():
            if layer_shape.groups(linear.kind):
                handles.append(block.get_submodule(linear.path).register_forward_pre_hook(input_hook(i, key)))

    if gradients:
        for spec in specs:
            acc.gradients[spec.name] = new_state(spec.param, spec.num_groups)

            def grad_hook(param, spec=spec):
                fold_gradient(param, param.grad, acc.gradients[spec.name], spec.axis, spec.num_groups)
                param.grad = None

            handles.append(spec.param.register_post_accumulate_grad_hook(grad_hook))
    return handles


def calibrate(model, batches, shape: ModelShape, specs: list[ParamSpec], statistics: tuple[str, ...],
              gradients: bool, progress: bool = False) -> Accumulators:
    """Run ``batches`` (LongTensor token ids, each (B, L)) through ``model`` once, with a backward pass when
    ``gradients``; the model's mode, requires_grad flags and .grad are restored afterwards."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    acc = Accumulators()
    saved_requires_grad = {p: p.requires_grad for p in model.parameters()}
    prunable = {id(s.param) for s in specs}
    for p in model.parameters():
        p.requires_grad_(gradients and id(p) in prunable)
    handles = install_hooks(model, shape, specs, acc, statistics, gradients)
    was_training = model.training
    model.eval()
    try:
        for step, batch in enumerate(tqdm(batches, desc="score", unit="batch", disable=not progress)):
            batch = batch.to(device)
            acc.tokens += batch.numel()
            if gradients:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise UsageError(
                        f"calibration loss is {loss.item()} at batch {step}; score in float32 "
                        f"(--dtype float32) or with a smaller --batch-size"
                    )
                loss.backward()
            else:
                with torch.no_grad():
                    model.base_model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_requires_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return acc
