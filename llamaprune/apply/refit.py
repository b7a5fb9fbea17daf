"""The compensation step of apply: the o_proj / down_proj tensors of a pruned checkpoint that error
compensation changes, by output name, for streaming (``apply.streaming.stream_checkpoint``) or an in-memory
``apply_plan`` to write instead of the plainly sliced ones.

Every kept o_proj and down_proj gets an output bias (zero where nothing of its input was removed), so the
checkpoint has one layout (``output_bias`` in its config, docs/ARTIFACTS.md).

    >>> stream = LayerStream.from_checkpoint(path, config)                          # doctest: +SKIP
    >>> tensors = refit_layers(stream, plan, windows, damp=1e-3)                    # doctest: +SKIP
    >>> tensors["model.layers.0.mlp.down_proj.bias"].shape                           # doctest: +SKIP
    torch.Size([576])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaprune.apply.compensation import Compensation, FitSums, mean_bias, non_finite, refit
from llamaprune.apply.slicing import kept_indices, tensor_route
from llamaprune.apply.spill import SpilledTensors
from llamaprune.core.arch import BLOCKS, LAYERS_PREFIX, Block, linear_biases, output_linear
from llamaprune.core.choices import parse_choice
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.plan_file import Plan
from llamaprune.io.layer_stream import LayerStream, unmap_large_frees
from llamaprune.io.weights import load_file, read_tensors, tensor_files
from llamaprune.scoring.in_memory import STATS_FILE

DEFAULT_DAMP = 1e-3
# The output projection of each block (o_proj, down_proj): the linears whose input columns a plan removes.
OUTPUTS = tuple(output_linear(block) for block in BLOCKS)


def output_key(plan: Plan, layer: int, path: str, what: str) -> str:
    route = tensor_route(f"{LAYERS_PREFIX}{layer}.{path}.{what}", plan)
    assert route is not None, (layer, path)
    return route[0]


def _capture(module: torch.nn.Module, run: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """The input ``module`` sees during one call of ``run``, and its output."""
    seen = {}
    handle = module.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    try:
        run()
    finally:
        handle.remove()
    return seen["x"], seen["y"]


class _Reached(Exception):
    """Raised by ``_input_of``'s hook: the rest of the forward is not needed."""


def _input_of(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The input ``module`` sees during ``run``, which stops there (nothing after it is computed)."""
    seen = {}

    def stop(mod, args):
        seen["x"] = args[0]
        raise _Reached

    handle = module.register_forward_pre_hook(stop)
    try:
        run()
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen["x"]


Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (inputs, unpruned outputs) of a linear


def _as_is(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection none of whose inputs were removed: its weight, and its bias (zero where it had none)."""
    weight, bias = linear.weight.detach(), linear.bias
    return weight, bias.detach() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def _fitted(linear: torch.nn.Linear, keep: torch.Tensor, damp: float, inputs: Batches,
            where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The refitted kept columns and output bias of ``linear`` from the batches of its calibration inputs and
    unpruned outputs that ``inputs`` yields."""
    sums = FitSums.of(linear.weight.detach(), keep, linear.bias)
    for x, y in inputs():
        sums.add(x, y)
    return refit(sums, damp, where)


def refit_layers(stream: LayerStream, plan: Plan, windows: torch.Tensor, damp: float,
                 progress: bool = True, spill: Path | None = None) -> Mapping[str, torch.Tensor]:
    """Sequential least-squares compensation: the calibration windows run through the pruned model layer by
    layer; each kept o_proj / down_proj is refitted (``compensation.refit``) so that, on the activations of the
    already pruned layers below, it reproduces what the unpruned sub-block outputs there. With ``spill`` (a
    directory), each layer's tensors go to disk as soon as they are fitted, so memory holds one layer."""
    from tqdm.auto import tqdm

    indices = kept_indices(plan)
    fitted = SpilledTensors(spill)
    with torch.no_grad():
        hidden = stream.embed(windows)
        for lp in tqdm(plan.layers, desc="compensate", unit="layer", disable=not progress):
            if lp.removed:
                continue
            tensors: dict[str, torch.Tensor] = {}
            with stream.layer(lp.layer) as decoder:
                for block in BLOCKS:
                    if block.name not in lp.skip:
                        keep = indices[lp.layer][output_linear(block).index]
                        hidden = _refit_block(stream, decoder, block, hidden, keep, damp, plan, lp.layer, tensors)
            if not torch.isfinite(hidden).all():
                raise non_finite(f"layer {lp.layer}")
            fitted.add(tensors)
    return fitted


def _refit_block(stream: LayerStream, decoder: torch.nn.Module, block: Block, hidden: torch.Tensor,
                 keep: torch.Tensor, damp: float, plan: Plan, layer: int, tensors: dict) -> torch.Tensor:
    """Refit the output projection of one sub-block on ``hidden`` and return the hidden states after the pruned,
    refitted sub-block. The kept inputs of the fit pass are reused when they are no larger than the hidden states
    (held anyway); wider ones (an MLP's) are drawn again, stopping at the projection."""
    path = output_linear(block).path
    proj = decoder.get_submodule(path)

    def run(h: torch.Tensor) -> torch.Tensor:
        return stream.sub_block(decoder, block, h)

    if len(keep) == proj.in_features:  # nothing to refit: the sub-block as it is
        _store(tensors, plan, layer, path, *_as_is(proj), False)
        return torch.cat([h + run(h) for h in stream.batches(hidden)])
    reuse = len(keep) <= hidden.shape[-1]
    kept_inputs = []

    def inputs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for h in stream.batches(hidden):
            z, y = _capture(proj, lambda h=h: run(h))
            if reuse:
                kept_inputs.append(z[..., keep.to(z.device)])
            yield z, y

    weight, bias = _fitted(proj, keep, damp, inputs, f"layer {layer}")
    _store(tensors, plan, layer, path, weight, bias, True)
    if not reuse:
        kept_inputs = (_input_of(proj, lambda h=h: run(h))[..., keep.to(h.device)] for h in stream.batches(hidden))
    return torch.cat([h + z @ weight.T + bias for h, z in zip(stream.batches(hidden), kept_inputs, strict=True)])


def _store(tensors: dict, plan: Plan, layer: int, path: str, weight: torch.Tensor, bias: torch.Tensor,
           removed: bool) -> None:
    """The refitted weight (only where columns were removed: otherwise the sliced one is the same) and the bias."""
    if removed:
        tensors[output_key(plan, layer, path, "weight")] = weight.cpu()
    tensors[output_key(plan, layer, path, "bias")] = bias.cpu()


def mean_biases(plan: Plan, stats: dict[str, torch.Tensor], weight_of: Callable[[str], torch.Tensor], config,
                source: str) -> dict[str, torch.Tensor]:
    """FLAP-style compensation from a run's recorded input sums: each kept o_proj / down_proj keeps its columns
    and gains the removed columns' mean contribution as its output bias. ``weight_of`` reads a source tensor by
    name."""
    indices = kept_indices(plan)
    tokens = float(stats["tokens"][0])
    has_bias = linear_biases(config)
    tensors: dict[str, torch.Tensor] = {}
    for lp in plan.layers:
        if lp.removed:
            continue
        for linear in OUTPUTS:
            block, path, index, input_name = linear.block, linear.path, linear.index, linear.input
            if block in lp.skip:
                continue
            key = f"layers.{lp.layer}.{input_name}.sum"
            if key not in stats:
                raise UsageError(
                    f"{source} has no input means ({key}); it was scored before compensation existed: score the "
                    f"model again with `llamaprune score`, or use {_use_lstsq()}"
                )
            prefix = f"{LAYERS_PREFIX}{lp.layer}.{path}"
            weight = weight_of(f"{prefix}.weight")
            bias = weight_of(f"{prefix}.bias") if has_bias[path] else None
            keep = indices[lp.layer][index]
            if len(keep) == weight.shape[1]:
                new_bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
                tensors[output_key(plan, lp.layer, path, "bias")] = new_bias
                continue
            # the kept columns are as the plan slices them: only the bias is new
            tensors[output_key(plan, lp.layer, path, "bias")] = mean_bias(stats[key] / tokens, weight, keep, bias)[1]
    return tensors


def _use_lstsq() -> str:
    return f"{flag('apply --compensate')} lstsq {flag('apply --calibration')} TEXT"


@dataclass(frozen=True)
class CompensationOptions:
    """How apply compensates: ``method``, and for ``lstsq`` the calibration text (``num_samples`` windows of
    ``seq_len`` tokens, seeded) and the ridge ``damp`` (relative to the mean diagonal of the inputs' Gram)."""

    method: Compensation = Compensation.none
    calibration: str | None = None
    num_samples: int = 128
    seq_len: int = 128
    damp: float = DEFAULT_DAMP
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None
    device: str = "cpu"  # where a streamed checkpoint's layers are run (an in-memory model stays where it is)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_choice(Compensation, self.method, flag("apply --compensate")))
        for name, option in (("num_samples", "--calibration-samples"), ("seq_len", "--calibration-seq-len")):
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag('apply ' + option)} must be positive, got {getattr(self, name)}")
        if self.batch_size <= 0:  # no command has a flag for it: every one runs 8 windows at a time
            raise UsageError(f"the compensation batch_size must be positive, got {self.batch_size}")
        if not self.damp >= 0:
            raise UsageError(f"{flag('apply --damp')} must be 0 or more, got {self.damp}")

    @property
    def calibration_file(self) -> Path | None:
        """The local calibration text, an input that no output may replace."""
        return Path(self.calibration) if self.calibration and Path(self.calibration).is_file() else None

    def rows(self, run_dir: Path | None) -> list[str] | None:
        """The calibration text's rows (lstsq), after checking that the method has what it needs."""
        from llamaprune.io.text_data import load_rows

        if self.method is Compensation.bias:
            stats_file(run_dir)
        if self.method is not Compensation.lstsq:
            return None
        if self.calibration is None:
            raise UsageError(
                f"{flag('apply --compensate')} lstsq refits on calibration text; give it with "
                f"{flag('apply --calibration')} TEXT"
            )
        return load_rows(self.calibration, split="train", data_dir=self.data_dir)

    def tensors(self, plan: Plan, config, source_path: str | None = None, loaded=None, rows: list[str] | None = None,
                run_dir: Path | None = None, progress: bool = True,
                spill: Path | None = None) -> Mapping[str, torch.Tensor]:
        """What the method writes instead of the sliced o_proj / down_proj tensors (empty for ``none``), for the
        safetensors checkpoint directory ``source_path`` (read layer by layer) or an in-memory model
        (``loaded``, a ``io.loading.LoadedModel``). ``spill``: a directory where refitted tensors wait on disk."""
        if self.method is Compensation.none:
            return {}
        if self.method is Compensation.bias:
            path = stats_file(run_dir)
            if loaded is not None:
                weight_of = loaded.model.state_dict().__getitem__
            else:
                files = tensor_files(Path(source_path))
                weight_of = lambda key: read_tensors(files, [key])[key]  # noqa: E731
            return mean_biases(plan, load_file(path), weight_of, config, str(path))
        from llamaprune.io.text_data import calibration_windows

        if loaded is not None:
            stream, tokenizer = LayerStream.from_model(loaded.model, self.batch_size), loaded.tokenizer
        else:
            from transformers import AutoTokenizer

            stream = LayerStream.from_checkpoint(Path(source_path), config, batch_size=self.batch_size,
                                                 device=self.device, head=False)
            tokenizer = AutoTokenizer.from_pretrained(source_path)
            unmap_large_frees()  # a layer's temporaries go back to the OS when freed, not to the heap
        windows = calibration_windows(tokenizer, rows, self.num_samples, self.seq_len, self.seed,
                                      flag("apply --calibration-seq-len"))
        return refit_layers(stream, plan, windows, self.damp, progress, spill)


def stats_file(run_dir: Path | None) -> Path:
    """The run's stats.safetensors, which holds the input sums that ``bias`` needs."""
    path = run_dir / STATS_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        raise UsageError(
            f"{flag('apply --compensate')} bias needs the input means in the plan's run directory ({STATS_FILE}), "
            f"and this plan has none; keep the plan in RUN/plans/ or use {_use_lstsq()}"
        )
    return path
