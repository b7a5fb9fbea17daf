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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import torch

from llamaprune.apply.compensation import Compensation, FitSums, mean_bias, non_finite, refit
from llamaprune.apply.selection import Pool, Selection, select
from llamaprune.apply.slicing import GROUP_FIELDS, group_columns, kept_indices, layer_indices, tensor_route
from llamaprune.apply.spill import SpilledTensors
from llamaprune.core.arch import BLOCKS, LAYERS_PREFIX, Block, family_of, linear_biases, output_linear
from llamaprune.core.choices import parse_choice
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.plan_file import LayerPlan, Plan
from llamaprune.io.layer_stream import LayerStream, unmap_large_frees
from llamaprune.io.weights import load_file, read_tensors, tensor_files
from llamaprune.scoring.importance.obs import DAMP as DEFAULT_DAMP
from llamaprune.scoring.in_memory import STATS_FILE

# The output projection of each block (o_proj, down_proj): the linears whose input columns a plan removes.
OUTPUTS = tuple(output_linear(block) for block in BLOCKS)


def output_key(plan: Plan, layer: int, path: str, what: str) -> str:
    route = tensor_route(f"{LAYERS_PREFIX}{layer}.{path}.{what}", plan)
    assert route is not None, (layer, path)
    return route[0]


def _capture(module: torch.nn.Module, run: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The input ``module`` sees during one call of ``run``, its output, and what ``run`` returns."""
    seen = {}
    handle = module.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    try:
        result = run()
    finally:
        handle.remove()
    return seen["x"], seen["y"], result


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


def _as_is(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection none of whose inputs were removed: its weight, and its bias (zero where it had none)."""
    weight, bias = linear.weight.detach(), linear.bias
    return weight, bias.detach() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


@dataclass(frozen=True)
class Compensated:
    """What compensation writes instead of the sliced o_proj / down_proj tensors (by output name), and the plan
    they are for: the input plan, or, with ``obs`` selection, the same counts with the groups chosen in the pass."""

    tensors: Mapping[str, torch.Tensor]
    plan: Plan


class Target(str, Enum):
    """What the refit reproduces. pruned: the unpruned sub-block's output on the pruned model's inputs; dense:
    the dense model's own sub-block output there, from a dense stream run beside the pruned one; residual: the
    dense model's hidden states after the block, so the refit also takes back error carried up from below (with a
    ``share`` under 1, only that share of the way from the pruned target)."""

    pruned = "pruned"
    dense = "dense"
    residual = "residual"


# The residual target's share in ``prune``'s recipe: on SmolLM2 at 10%, 20% and 30%, a third of the way to the dense
# hidden states gained on WikiText and on text of another domain, where the whole way fits the calibration text's
# carried error and loses the other domain (bench/RESULTS.md).
DEFAULT_RESIDUAL_SHARE = 0.3


def residual_fits(config) -> bool:
    """Whether the residual target is linear in the refit for this model's family: not where the output projection
    passes through a norm before the residual (Gemma 3), which gives the hidden states' difference no linear
    target."""
    return family_of(config).blocks[0].post_norm is None


def refit_layers(stream: LayerStream, plan: Plan, windows: torch.Tensor, damp: float,
                 progress: bool = True, spill: Path | None = None, selection: Selection = Selection.score,
                 swaps: int = 0, target: Target = Target.pruned, pool: Pool | None = None,
                 share: float = 1.0) -> Compensated:
    """Sequential least-squares compensation: the calibration windows run through the pruned model layer by
    layer; each kept o_proj / down_proj is refitted (``compensation.refit``) so that, on the activations of the
    already pruned layers below, it reproduces the ``target``. ``obs`` selection first chooses which groups each
    block loses, on those same activations (``apply.selection``; among ``pool``'s candidates, if given), keeping
    the plan's counts. ``share``: how far the residual target goes from the pruned one. With ``spill`` (a
    directory), each layer's tensors go to disk as soon as they are fitted, so memory holds one layer."""
    from tqdm.auto import tqdm

    fitted = SpilledTensors(spill)
    layers = []
    with torch.no_grad():
        hidden = stream.embed(windows)
        dense = None if target is Target.pruned else hidden
        for lp in tqdm(plan.layers, desc="compensate", unit="layer", disable=not progress):
            if lp.removed:
                layers.append(lp)
                if dense is not None:
                    with stream.layer(lp.layer) as decoder:
                        dense = stream.run_layer(decoder, dense)
                continue
            tensors: dict[str, torch.Tensor] = {}
            with stream.layer(lp.layer) as decoder:
                for block in family_of(stream.model.config).blocks:
                    if block.name in lp.skip:
                        if dense is not None:
                            dense = _advance(stream, decoder, block, dense)
                        continue
                    step = _BlockFit(stream, decoder, block, plan, damp, target, share)
                    lp, hidden, dense = step.run(lp, hidden, dense, tensors, selection, swaps, pool)
            if not torch.isfinite(hidden).all():
                raise non_finite(f"layer {lp.layer}")
            fitted.add(tensors)
            layers.append(lp)
    return Compensated(fitted, plan if selection is Selection.score else replace(plan, layers=tuple(layers)))


def _advance(stream: LayerStream, decoder: torch.nn.Module, block: Block, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` after the unpruned sub-block ``block``."""
    return torch.cat([h + stream.sub_block(decoder, block, h) for h in stream.batches(hidden)])


@dataclass
class _BlockFit:
    """The compensation of one sub-block: one pass over its calibration inputs gathers the sums of its output
    projection (``FitSums``), on which obs chooses the groups it loses and the refit fits the rest; then the pruned
    stream goes on through the refitted sub-block, and the dense stream (None unless the target needs it) through
    the unpruned one."""

    stream: LayerStream
    decoder: torch.nn.Module
    block: Block
    plan: Plan
    damp: float
    target: Target
    share: float

    def sub_block(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stream.sub_block(self.decoder, self.block, hidden)

    def inputs(self, hidden: torch.Tensor, proj: torch.nn.Module) -> torch.Tensor:
        """The projection's inputs for ``hidden``: the sub-block runs up to it and stops."""
        return _input_of(proj, lambda: self.sub_block(hidden))

    def run(self, lp: LayerPlan, hidden: torch.Tensor, dense: torch.Tensor | None, tensors: dict,
            selection: Selection, swaps: int, pool: Pool | None
            ) -> tuple[LayerPlan, torch.Tensor, torch.Tensor | None]:
        """The layer plan (its groups of this block chosen by obs, with ``selection`` obs), and both streams after
        the sub-block; the refitted tensors go into ``tensors``."""
        stream, linear = self.stream, output_linear(self.block)
        proj = self.decoder.get_submodule(linear.path)
        keep = layer_indices(lp, self.plan.head_dim)[linear.index]
        if len(keep) == proj.in_features:  # nothing to refit: the sub-block as it is
            _store(tensors, self.plan, lp.layer, linear.path, *_as_is(proj), False)
            return lp, _advance(stream, self.decoder, self.block, hidden), \
                None if dense is None else _advance(stream, self.decoder, self.block, dense)
        sums, stored, dense = self.sums(proj, hidden, dense)
        if selection is Selection.obs:
            lp = self.choose(proj, sums.gram, lp, swaps, pool)
            keep = layer_indices(lp, self.plan.head_dim)[linear.index]
        weight, bias = refit(sums, keep, self.damp, f"layer {lp.layer}")
        _store(tensors, self.plan, lp.layer, linear.path, weight, bias, True)
        keep = keep.to(hidden.device)
        kept_inputs = (z[..., keep] for z in stored) if stored is not None else \
            (self.inputs(h, proj)[..., keep] for h in stream.batches(hidden))

        def after(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            if self.block.post_norm is None:  # added in this order, as the refits of checkpoints made before
                return h + z @ weight.T + bias
            return h + stream.post_norm(self.decoder, self.block, z @ weight.T + bias)

        hidden = torch.cat([after(h, z) for h, z in zip(stream.batches(hidden), kept_inputs, strict=True)])
        return lp, hidden, dense

    def sums(self, proj: torch.nn.Module, hidden: torch.Tensor, dense: torch.Tensor | None
             ) -> tuple[FitSums, list[torch.Tensor] | None, torch.Tensor | None]:
        """The projection's sums over the calibration batches; its inputs, kept when they are no wider than the
        hidden states (held anyway; an MLP's are drawn again after the refit); and the dense stream after the
        unpruned sub-block. A residual target short of ``share`` 1 is that share of the way there from the pruned
        target: the whole way fits the calibration text's carried error at the expense of other text
        (bench/RESULTS.md)."""
        residual = self.target is Target.residual
        sums = FitSums.of(proj.weight, proj.bias, target=dense is not None, share=self.share if residual else 1.0)
        stored = [] if proj.in_features <= hidden.shape[-1] else None
        dense_after = []
        batches = self.stream.batches(hidden)
        for h, d in zip(batches, self.stream.batches(dense) if dense is not None else [None] * len(batches),
                        strict=True):
            z = self.inputs(h, proj)
            if d is None:
                sums.add(z)
            else:  # the target comes from the dense stream: y, the unpruned projection's output there
                _, y, update = _capture(proj, lambda d=d: self.sub_block(d))
                dense_after.append(d + update)
                sums.add(z, y + (d - h) if residual else y)  # residual: a family without a norm after the projection
            if stored is not None:
                stored.append(z)
        return sums, stored, torch.cat(dense_after) if dense is not None else None

    def choose(self, proj: torch.nn.Module, gram: torch.Tensor, lp: LayerPlan, swaps: int,
               pool: Pool | None) -> LayerPlan:
        """``lp`` with the groups of the block it keeps chosen by structured OBS on ``gram``, the Gram matrix of the
        projection's inputs."""
        linear = output_linear(self.block)
        field = GROUP_FIELDS[linear.index]
        planned = torch.tensor(getattr(lp, field), dtype=torch.long)
        groups = group_columns(lp, self.plan.head_dim, linear.index)
        remove = len(groups) - len(planned)
        bias = None if proj.bias is None else proj.bias.detach()
        allowed = pool.allowed(lp.layer, self.block.kind, remove) if pool is not None else None
        kept = select(gram, proj.weight.detach(), bias, groups, remove, self.damp, swaps, planned,
                      f"layer {lp.layer} ({self.block.name})", allowed)
        return replace(lp, **{field: tuple(kept.tolist())})


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
    ``seq_len`` tokens, seeded), the ridge ``damp`` (relative to the mean diagonal of the inputs' Gram), how
    the removed groups are chosen (``select``; ``swaps``: OBS swap rounds per block; ``obs_pool``: OBS chooses
    among that many times each block's count of its lowest-scored groups, by the plan's criterion in its run) and
    what the refit reproduces (``target``; ``residual_share``: how far the residual target goes from the pruned
    one)."""

    method: Compensation = Compensation.none
    calibration: str | None = None
    num_samples: int = 128
    seq_len: int = 128
    damp: float = DEFAULT_DAMP
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None
    device: str = "cpu"  # where a streamed checkpoint's layers are run (an in-memory model stays where it is)
    select: Selection = Selection.score
    swaps: int = 0
    target: Target = Target.pruned
    obs_pool: float | None = None
    residual_share: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_choice(Compensation, self.method, flag("apply --compensate")))
        object.__setattr__(self, "target", parse_choice(Target, self.target, flag("apply --target")))
        lstsq = self.method is Compensation.lstsq
        object.__setattr__(self, "select", parse_choice(Selection, self.select, flag("apply --select")))
        if self.select is Selection.obs and not lstsq:
            raise UsageError(f"{flag('apply --select')} obs chooses the groups inside the least-squares refit; add "
                             f"{flag('apply --compensate')} lstsq {flag('apply --calibration')} TEXT")
        if self.target is not Target.pruned and not lstsq:
            raise UsageError(f"{flag('apply --target')} is the least-squares refit's; add {flag('apply --compensate')} "
                             f"lstsq {flag('apply --calibration')} TEXT")
        if not 0 < self.residual_share <= 1 or (self.residual_share != 1 and self.target is not Target.residual):
            raise UsageError(f"{flag('apply --residual-share')} is a share in (0, 1] of the way from the pruned target "
                             f"to {flag('apply --target')} residual; got {self.residual_share} with target "
                             f"{self.target.value}")
        if self.swaps < 0 or (self.swaps and self.select is not Selection.obs):
            raise UsageError(f"{flag('apply --swaps')} must be 0 or more, and is for {flag('apply --select')} obs; "
                             f"got {self.swaps}")
        if self.obs_pool is not None and (self.select is not Selection.obs or not self.obs_pool >= 1):
            raise UsageError(f"{flag('apply --obs-pool')} is a factor of at least 1 (1: the plan's own groups), for "
                             f"{flag('apply --select')} obs; got {self.obs_pool}")
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

    def rows(self, run_dir: Path | None, criterion: str) -> list[str] | None:
        """The calibration text's rows (lstsq), after checking that the method has what it needs from the run of a
        plan by ``criterion``."""
        from llamaprune.io.text_data import load_rows

        if self.method is Compensation.bias:
            stats_file(run_dir)
        if self.method is not Compensation.lstsq:
            return None
        if self.obs_pool is not None:
            Pool.table_of(run_dir, criterion)
        if self.calibration is None:
            raise UsageError(
                f"{flag('apply --compensate')} lstsq refits on calibration text; give it with "
                f"{flag('apply --calibration')} TEXT"
            )
        return load_rows(self.calibration, split="train", data_dir=self.data_dir)

    def check_model(self, config) -> None:
        """Refuse, before any weights load, what this model's family cannot take (``residual_fits``)."""
        if self.target is Target.residual and not residual_fits(config):
            raise UsageError(
                f"{flag('apply --target')} residual cannot be fitted through the norm after o_proj and down_proj of "
                f"{family_of(config).architecture}; use {flag('apply --target')} pruned or dense"
            )

    def compensate(self, plan: Plan, config, source_path: str | None = None, loaded=None,
                   rows: list[str] | None = None, run_dir: Path | None = None, progress: bool = True,
                   spill: Path | None = None) -> Compensated:
        """What the method writes instead of the sliced o_proj / down_proj tensors (none for ``none``) and the plan
        to slice by, for the safetensors checkpoint directory ``source_path`` (read layer by layer) or an
        in-memory model (``loaded``, a ``io.loading.LoadedModel``). ``spill``: a directory where refitted tensors
        wait on disk."""
        if self.method is Compensation.none:
            return Compensated({}, plan)
        self.check_model(config)
        if self.method is Compensation.bias:
            path = stats_file(run_dir)
            if loaded is not None:
                weight_of = loaded.model.state_dict().__getitem__
            else:
                files = tensor_files(Path(source_path))
                weight_of = lambda key: read_tensors(files, [key])[key]  # noqa: E731
            return Compensated(mean_biases(plan, load_file(path), weight_of, config, str(path)), plan)
        from llamaprune.io.text_data import calibration_windows

        pool = Pool.of_run(self.obs_pool, run_dir, plan.criterion) if self.obs_pool is not None else None
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
        done = refit_layers(stream, plan, windows, self.damp, progress, spill, self.select, self.swaps, self.target,
                            pool, self.residual_share)
        if self.select is Selection.score:
            return done
        record = {"method": self.select.value, "swaps": self.swaps, "pool": self.obs_pool,
                  "calibration": self.calibration, "num_samples": self.num_samples, "seq_len": self.seq_len,
                  "seed": self.seed, "damp": self.damp}
        return replace(done, plan=replace(done.plan, selection=record))


def recipe(options: CompensationOptions, config=None) -> CompensationOptions:
    """``options`` (lstsq) with ``prune``'s recipe: the groups chosen by OBS among ``DEFAULT_POOL`` x each block's
    count of the plan's lowest-scored ones, each projection fitted ``DEFAULT_RESIDUAL_SHARE`` of the way to the
    dense hidden states where the model's family allows it (``config``; without one, the pruned target): the
    recipe that beat the plan's own groups on WikiText and on text of another domain (bench/RESULTS.md)."""
    from llamaprune.apply.selection import DEFAULT_POOL

    if options.method is not Compensation.lstsq:
        return options
    options = replace(options, select=Selection.obs, obs_pool=DEFAULT_POOL)
    if config is None or not residual_fits(config):
        return options
    return replace(options, target=Target.residual, residual_share=DEFAULT_RESIDUAL_SHARE)


def stats_file(run_dir: Path | None) -> Path:
    """The run's stats.safetensors, which holds the input sums that ``bias`` needs."""
    path = run_dir / STATS_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        raise UsageError(
            f"{flag('apply --compensate')} bias needs the input means in the plan's run directory ({STATS_FILE}), "
            f"and this plan has none (a run scored with `score --after` has none either); keep the plan in "
            f"RUN/plans/ or use {_use_lstsq()}"
        )
    return path
