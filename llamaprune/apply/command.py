"""Phase 3: apply a saved plan to a checkpoint, giving a smaller checkpoint that ``from_pretrained`` loads.

Safetensors checkpoints (a directory, or the embedded default) are sliced tensor by tensor without loading
the model; other sources (GGUF, hub ids) are loaded, pruned in memory with ``apply_plan`` and saved.

    >>> apply(ApplyOptions(plan=Path("artifacts/run1/plans/global-taylor-0.20.json"),
    ...                    model="smollm2-135m", out=Path("artifacts/run1/model")))   # doctest: +SKIP
    >>> pruned = apply_plan(load_model("smollm2-135m").model, read_plan(plan_path))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llamaprune.apply.refit import CompensationOptions
from llamaprune.apply.streaming import check_params, stream_checkpoint
from llamaprune.core.artifacts import MANIFEST, atomic_write_json, manifest_in, new_manifest, plain_value
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.groups import config_fingerprint
from llamaprune.core.plan_file import Plan, check_plan, read_plan, write_plan
from llamaprune.evaluate.perplexity import EVAL_FILE, EvalOptions, compare, measure
from llamaprune.evaluate.speed import measure_pair
from llamaprune.io.loading import Device, DType, load_model, register, resolve_device
from llamaprune.io.pruned_checkpoint import PLAN_FILE, pruned_config, save_pruned, write_config, write_tokenizer_files
from llamaprune.io.weights import safetensors_files
from llamaprune.recover.finetune import FinetuneOptions
from llamaprune.runs.peak_memory import available_bytes
from llamaprune.runs.phase import Checked, Phase, run_phase

log = logging.getLogger(__name__)
# Inside the output's temporary directory: refitted tensors wait there, one file per layer, until streamed.
SPILL_DIR = ".compensation"


@dataclass(frozen=True)
class ApplyOptions:
    """What ``llamaprune apply`` does; ``dtype`` None keeps the checkpoint's dtype when streaming."""

    plan: Path
    model: str
    out: Path
    dtype: DType | None = None
    device: Device = Device.cpu
    max_shard_size: str = "2GB"
    overwrite: bool = False
    eval: EvalOptions | None = None
    compensation: CompensationOptions = CompensationOptions()
    force: bool = False  # apply a plan scored on other weights of the same shapes

    def __post_init__(self) -> None:
        _ = self.shard_bytes  # a bad size fails before any work

    @property
    def load_dtype(self) -> DType:
        return self.dtype or DType.float32

    @property
    def shard_bytes(self) -> int:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            size = convert_file_size_to_int(self.max_shard_size)
        except ValueError:
            size = 0
        if size <= 0:
            raise UsageError(f"--max-shard-size {self.max_shard_size!r} is not a size; use e.g. 2GB, 500MB or 1GiB")
        return size




def check_scored_weights(plan: Plan, weights: str | None, options: ApplyOptions, what: str) -> None:
    """Refuse a plan scored on other weights than the checkpoint's (of the same shapes, or the fingerprint
    check would have), unless ``force``; either fingerprint unknown (GGUF, hub, .bin, older plans): no check."""
    if None in (plan.weights_fingerprint, weights) or plan.weights_fingerprint == weights:
        return
    if options.force:
        log.warning("%s was scored on weights %s, %s has %s: applied anyway (--force)",
                    what, plan.weights_fingerprint, options.model, weights)
        return
    raise UsageError(
        f"{what} was scored on weights {plan.weights_fingerprint}, but {options.model} has weights {weights} "
        f"(another checkpoint of the same shapes, or the same one in another dtype); score {options.model} with "
        f"`llamaprune score`, or pass --force to apply the plan anyway"
    )


def apply_plan(model, plan: Plan, replace: dict | None = None):
    """A new model: ``model`` pruned by ``plan`` in memory, tensor by tensor with the rules streaming uses.
    ``model`` itself is left as it was. Sliced tensors are new; the others (embeddings, norms, projections
    that lose nothing) are shared with ``model``, not copied, so training the result in place changes them in
    ``model`` too. ``replace`` (output name -> tensor, from ``apply.refit.CompensationOptions.tensors``) takes the place
    of the sliced o_proj / down_proj tensors and adds their output biases."""
    from llamaprune.apply.slicing import pruned_state

    check_plan(plan, model.config, f"plan {plan.name!r}")
    config = pruned_config(model.config, plan, output_bias=bool(replace))
    state = pruned_state(model.state_dict(), plan)
    added = sum(t.numel() for key, t in (replace or {}).items() if key not in state)
    state.update(replace or {})
    buffers = pruned_state(dict(model.named_buffers()), plan)
    pruned = rehouse(model, config, state, buffers)
    check_params(pruned.num_parameters() - added, plan)
    return pruned


def rehouse(model, config, state: dict, buffers: dict):
    """The model class of ``config`` around the tensors ``state`` (a state dict) and ``buffers`` (by name; the
    non-persistent ones such as rotary inv_freq are not in a state dict), without copying them; generation
    settings and tied weights as in ``model``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    register()
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(
            config, dtype=model.dtype, attn_implementation=model.config._attn_implementation
        )
    target.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(target.named_buffers()):
        if buffer.is_meta:
            module, _, attr = name.rpartition(".")
            setattr(target.get_submodule(module), attr, buffers[name])
    target.tie_weights()
    target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()


def run_dir_of(plan_path: Path) -> Path | None:
    """The run directory a plan was made in (``RUN/plans/NAME.json``), when it has a manifest."""
    run_dir = Path(plan_path).resolve().parent.parent
    return run_dir if (run_dir / MANIFEST).is_file() else None


def apply(options: ApplyOptions) -> dict:
    """Write the pruned checkpoint to ``options.out`` atomically; returns the summary put in the manifest."""
    plan = read_plan(options.plan)
    compensation, run_dir = options.compensation, run_dir_of(options.plan)
    compensation = dataclasses.replace(compensation, device=resolve_device(options.device))

    def inputs(checked: Checked) -> tuple[list[str] | None, list[str] | None]:
        """Evaluation and calibration texts: bad input fails here, before any weights load."""
        check_plan(plan, checked.config, f"plan {options.plan}")
        compensation.check_model(checked.config)
        check_scored_weights(plan, checked.weights, options, f"plan {options.plan}")
        return options.eval.test_rows() if options.eval else None, compensation.rows(run_dir, plan.criterion)

    evaluation = options.eval
    phase = Phase("apply", options.out, options.overwrite, options.model, options.device,
                  inputs=(options.plan, run_dir and run_dir / MANIFEST, evaluation and evaluation.test_file,
                          compensation.calibration_file),
                  tokenizer=evaluation is not None,
                  seq_lens=((flag("eval --seq-len"), evaluation.seq_len),) if evaluation else ())
    with run_phase(phase, inputs) as run:
        source, config, tmp = run.checked.source, run.checked.config, run.dir
        rows, calibration = run.inputs
        files = safetensors_files(Path(source.path)) if source.kind == "dir" else None
        run.summary.update(plan=str(options.plan), model=options.model, out=str(options.out))
        loaded = None
        if files is None:
            log.info("loading %s to prune it in memory", options.model)
            loaded = load_model(options.model, options.load_dtype, options.device)
        started = time.perf_counter()
        spill = tmp / SPILL_DIR if loaded is None else None
        done = compensation.compensate(plan, config, source.path, loaded, calibration, run_dir, spill=spill)
        replace, sliced = done.tensors, done.plan  # obs selection chooses the kept groups again
        if replace:
            seconds = round(time.perf_counter() - started, 3)
            run.summary["compensation"] = {**plain_value(compensation), "seconds": seconds}
        if loaded is None:
            log.info("streaming %d safetensors file(s) of %s", len(files), options.model)
            target = pruned_config(config, sliced, output_bias=bool(replace))
            if options.dtype is not None:
                target.dtype = DType(options.dtype).value
            tied = bool(getattr(config, "tie_word_embeddings", False))
            stream_checkpoint(files, sliced, tmp, options.shard_bytes, options.dtype, tied, replace)
            shutil.rmtree(spill, ignore_errors=True)
            write_config(target, tmp)
            write_tokenizer_files(source.path, tmp)
        else:
            save_pruned(apply_plan(loaded.model, sliced, replace), tmp, options.shard_bytes)
            loaded.tokenizer.save_pretrained(tmp)
        run.summary.update(streamed=files is not None, params_before=plan.params_before,
                           params_after=plan.params_after)
        if options.eval:
            run.summary["eval"] = _evaluate(options, rows, tmp, plan, loaded)
            atomic_write_json(tmp / EVAL_FILE, run.summary["eval"])
        run.summary["seconds"] = run.seconds()
        if sliced is plan:
            shutil.copyfile(options.plan, tmp / PLAN_FILE)
        else:  # the groups chosen in the pass: applying this plan with --select score makes the same checkpoint
            write_plan(sliced, tmp / PLAN_FILE)
            run.summary["selected_plan"] = str(options.out / PLAN_FILE)
        # The run's manifest with this apply appended (a new one when the plan has no run directory).
        model = {"source": source.name, "path": source.path, "fingerprint": config_fingerprint(config)}
        run.record(manifest_in(run_dir) or new_manifest(model, plan=plan.name), also=run_dir)
    return run.summary


def _evaluate(options: ApplyOptions, rows: list[str], pruned_dir: Path, plan: Plan, loaded=None) -> dict:
    """eval.json: the source's and the written checkpoint's perplexity, each after a warm-up batch, and their
    forward speed, timed in turn with both models in memory (``evaluate.speed.measure_pair``). ``loaded``: the
    source already in memory (pruned in memory); a streamed source is loaded for this alone, and the pruned model
    beside it only where that fits in half the memory left: otherwise each is measured alone, the source freed
    first, and their speeds are not compared."""
    register()
    source = loaded or load_model(options.model, options.load_dtype, options.device)
    if loaded is None and not _fits_beside(source.model, plan.params_after):
        log.warning("the pruned model does not fit beside %s in half the memory left: each is measured alone, and "
                    "their forward speeds are not compared", options.model)
        before = measure(source.model, source.tokenizer, options.eval, rows)
        source = None
        gc.collect()
        pruned = load_model(str(pruned_dir), options.load_dtype, options.device)
        return compare(options.eval, before, measure(pruned.model, pruned.tokenizer, options.eval, rows))
    pruned = load_model(str(pruned_dir), options.load_dtype, options.device)
    return compare(options.eval, *measure_pair(source.model, pruned.model, source.tokenizer, options.eval, rows))


def _fits_beside(model, params: int) -> bool:
    """Whether ``params`` parameters in ``model``'s dtype fit on its device in half the memory left there."""
    parameter = next(model.parameters())
    available = available_bytes(parameter.device)
    return available is not None and params * parameter.element_size() <= available / 2


def apply_and_finetune(options: ApplyOptions,
                       finetune: FinetuneOptions | None = None) -> tuple[Path, dict, dict | None]:
    """``apply --finetune``: the pruned checkpoint goes to ``OUT-pruned`` (kept) and its finetuned copy to OUT;
    returns where the pruned checkpoint is, the apply's summary and the finetune's (None without ``finetune``).
    The finetune's input is the apply's output: everything but that is checked, and bad finetuning data or a
    teacher that cannot teach it (checked against the model the plan prunes) fails, before any work."""
    if finetune is None:
        return options.out, apply(options), None
    from llamaprune.recover.command import FinetuneRun, read_inputs, run_finetune
    from llamaprune.recover.teacher import check_teacher
    from llamaprune.runs.phase import preflight

    pruned = options.out.with_name(f"{options.out.name}-pruned")
    recovery = FinetuneRun(str(pruned), options.out, finetune, options.eval, dtype=options.load_dtype,
                           device=options.device, overwrite=options.overwrite, max_shard_size=options.max_shard_size)
    preflight(recovery.phase(model_ready=False), lambda _: read_inputs(recovery, model_ready=False))
    plan = read_plan(options.plan)
    check_teacher(finetune.distill, options.model, plan, len(plan.layers) - len(plan.removed_layers))
    summary = apply(dataclasses.replace(options, out=pruned))
    return pruned, summary, run_finetune(recovery)
