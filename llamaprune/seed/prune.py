"""The one-shot ``llamaprune prune``: score -> plan -> apply (-> finetune) -> eval with the model loaded once,
under the seed toolkit's option names; writes the native run directory and the seed's files side by side.

The model is scored in memory, the plan is made from the tables just written (as ``llamaprune plan`` would),
``apply_plan`` prunes the loaded model into a new one, which is optionally finetuned and saved with ``save_pruned``.

    >>> options = PruneOptions(base_model="smollm2-135m", pruning_ratio=0.2, importance_method="taylor_2nd",
    ...                        save_ckpt_log_name="global-20", save_model=True, test_after_prune=True)
    >>> summary = prune(options)                       # doctest: +SKIP
    >>> print("\\n".join(summary_lines(summary)))       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

from llamaprune.core.artifacts import MANIFEST, atomic_write_json, plain_value, with_history
from llamaprune.core.choices import parse_choice
from llamaprune.core.criteria import NAMES, canonical
from llamaprune.core.errors import UsageError, flags_named
from llamaprune.evaluate.perplexity import EVAL_FILE, EvalOptions, measure
from llamaprune.evaluate.speed import measure_pair, speed_text
from llamaprune.evaluate.zero_shot import task_lines, task_options
from llamaprune.io.loading import Device, DType
from llamaprune.plan import LayerStrategy, Normalize, PlanOptions, Strategy
from llamaprune.recover.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, distillation
from llamaprune.recover.finetune import FinetuneOptions, Method
from llamaprune.recover.loss_curve import CURVE_JSON, CURVE_PNG
from llamaprune.runs.command_log import TRAINING_LOG
from llamaprune.runs.phase import Phase, PhaseRun, run_phase
from llamaprune.scoring.in_memory import ScoreOptions

log = logging.getLogger(__name__)

ARTIFACTS = Path("artifacts")
MODEL_DIR = "model"


class _CriterionName(str, Enum):
    @property
    def criterion(self) -> str:
        """The criterion this name stands for (``taylor_2nd`` -> ``taylor2``)."""
        return canonical(self.value)


# Every criterion name of the registry, with the seed's (``taylor_2nd`` is our ``taylor2``).
ImportanceMethod = _CriterionName("ImportanceMethod", {name: name for name in NAMES}, module=__name__)


class PruneMethod(str, Enum):
    """The seed's ``--method``: ``global`` (recommended) or layer-wise (``layer`` and ``layerwise`` alike)."""

    global_ = "global"
    layer = "layer"
    layerwise = "layerwise"

    @property
    def strategy(self) -> Strategy:
        return Strategy.global_ if self is PruneMethod.global_ else Strategy.layerwise


# What the phases' options are called here (see llamaprune.core.errors.flag): the seed's flag, or None for one that
# ``prune`` leaves at its default.
SEED_FLAGS: dict[str, str | None] = {
    "score --num-samples": "--num_samples",
    "score --seq-len": "--seq_len",
    "score --batch-size": "--gradient_batch_size",
    "score --criteria": "--importance_method",
    "score --fisher-windows": None,
    "score --accumulate": None,
    "plan --ratio": "--pruning_ratio",
    "plan --criterion": "--importance_method",
    "plan --strategy": "--method",
    "plan --distribution": "--pruning_distribution",
    "plan --layer-strategy": "--pruning_strategy",
    "plan --freeze-top-n": "--freeze_top_n_layers",
    "plan --remove-empty-layers": "--remove_empty_layers",
    "plan --layer-importance": None,
    "plan --protect-layers": None,
    "plan --min-kv-heads": None,
    "plan --min-mlp-channels": None,
    "plan --round-to": None,
    "plan --uniform": None,
    "apply --calibration": "--dataset",
    "apply --calibration-samples": "--compensation_samples",
    "apply --calibration-seq-len": "--seq_len",
    "apply --damp": None,
    "eval --seq-len": "--eval_seq_len",
    "eval --max-windows": "--max_windows",
    "eval --batch-size": None,
    "finetune --method": "--finetune_method",
    "finetune --dataset": "--finetune_dataset",
    "finetune --samples": "--finetune_samples",
    "finetune --seq-len": "--finetune_seq_len",
    "finetune --lr": "--finetune_lr",
    "finetune --lora-r": "--lora_r",
    "finetune --lora-alpha": "--lora_alpha",
    "finetune --teacher": "--teacher",
    "finetune --kd-temperature": "--kd_temperature",
    "finetune --kd-weight": "--kd_weight",
    "finetune --kd-top-k": "--kd_top_k",
    "finetune --kd-hidden": "--kd_hidden",
    "finetune --teacher-device": "--teacher_device",
    **dict.fromkeys(
        ("finetune --epochs", "finetune --batch-size", "finetune --grad-accum", "finetune --lora-dropout",
         "finetune --lora-targets", "finetune --val-every")
    ),
}


@dataclass(frozen=True)
class PruneOptions:
    """Everything ``llamaprune prune`` does, under the seed's names; ``output_dir`` None means
    ``artifacts/<save_ckpt_log_name>``, ``finetune_dataset`` None the calibration ``dataset``, ``teacher`` None the
    ``base_model`` (``none``: no distillation)."""

    base_model: str = "smollm2-135m"
    save_ckpt_log_name: str = "prune"
    pruning_ratio: float = 0.2
    importance_method: ImportanceMethod = ImportanceMethod.taylor
    method: PruneMethod = PruneMethod.global_
    pruning_distribution: tuple[int, int] | None = None
    pruning_strategy: LayerStrategy = LayerStrategy.inverse
    freeze_top_n_layers: int = 0
    remove_empty_layers: bool = False
    normalize: Normalize = Normalize.none
    compensate: str = "lstsq"  # llamaprune.apply.compensation.Compensation, checked by compensation_options()
    compensation_samples: int = 1024
    dataset: str = "wikitext2"
    num_samples: int = 128
    seq_len: int = 128
    gradient_batch_size: int = 8
    test_after_prune: bool = False
    eval_dataset: str = "wikitext2"
    eval_seq_len: int = 128
    max_windows: int | None = None
    tasks: str | None = None  # comma-separated lm-eval tasks, measured beside perplexity
    tasks_limit: int | None = None
    tasks_dir: str | None = None
    save_model: bool = False
    finetune: bool = False
    finetune_method: Method = Method.lora
    finetune_dataset: str | None = None
    finetune_samples: int = 1000
    finetune_seq_len: int = 256
    finetune_lr: float | None = None
    lora_r: int = 16
    lora_alpha: float = 32.0
    teacher: str | None = None
    kd_temperature: float = DEFAULT_TEMPERATURE
    kd_weight: float = DEFAULT_WEIGHT
    kd_top_k: int | None = None
    kd_hidden: float = 0.0
    teacher_device: Device | None = None
    output_dir: Path | None = None
    data_dir: str | None = None
    device: Device = Device.cpu
    dtype: DType = DType.float32
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, enum in (
            ("importance_method", ImportanceMethod),
            ("method", PruneMethod),
            ("pruning_strategy", LayerStrategy),
            ("finetune_method", Method),
            ("normalize", Normalize),
        ):
            object.__setattr__(self, name, parse_choice(enum, getattr(self, name), f"--{name}"))
        name = self.save_ckpt_log_name
        if self.output_dir is None and (not name or name.startswith(".") or any(c in name for c in "/\\\0")):
            raise UsageError(
                f"--save_ckpt_log_name {name!r} must be a plain directory name, e.g. llama_prune_20"
            )
        if self.tasks is not None and not self.test_after_prune:
            raise UsageError("--tasks is measured with perplexity after pruning; add --test_after_prune")
        # Every phase checks its own options: bad input fails here, before any data or weights load.
        with flags_named(SEED_FLAGS):
            self.score_options(), self.plan_options(), self.eval_options(), self.finetune_options()
            self.compensation_options()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else ARTIFACTS / self.save_ckpt_log_name

    @property
    def phase(self) -> Phase:
        from llamaprune.io.text_data import local_file

        seq_lens = [("--seq_len", self.seq_len)]
        seq_lens += [("--eval_seq_len", self.eval_seq_len)] if self.test_after_prune else []
        seq_lens += [("--finetune_seq_len", self.finetune_seq_len)] if self.finetune else []
        finetune = self.finetune_options()
        return Phase(
            "prune", self.run_dir, self.overwrite, self.base_model, self.device, TRAINING_LOG,
            inputs=(local_file(self.dataset, "train", self.data_dir),
                    self.eval_options().test_file if self.test_after_prune else None,
                    local_file(finetune.dataset, "train", self.data_dir) if self.finetune else None),
            seq_lens=tuple(seq_lens), out_option="--output_dir",
        )

    def score_options(self) -> ScoreOptions:
        """Only the one criterion asked for is scored."""
        return ScoreOptions(
            self.base_model,
            self.dataset,
            self.num_samples,
            self.seq_len,
            self.gradient_batch_size,
            (self.importance_method.criterion,),
            self.seed,
            self.dtype,
            self.device,
            self.data_dir,
        )

    def plan_options(self) -> PlanOptions:
        layerwise = self.method.strategy is Strategy.layerwise
        return PlanOptions(
            ratio=self.pruning_ratio,
            criterion=self.importance_method.criterion,
            strategy=self.method.strategy,
            distribution=self.pruning_distribution if layerwise else None,
            layer_strategy=self.pruning_strategy,
            freeze_top_n=self.freeze_top_n_layers,
            remove_empty_layers=self.remove_empty_layers,
            normalize=self.normalize if not layerwise else Normalize.none,
        )

    def compensation_options(self, config=None):
        """lstsq refits on the calibration text, ``compensation_samples`` windows of ``seq_len`` tokens, by
        ``prune``'s recipe (``apply.refit.recipe``, for ``config``'s family)."""
        from llamaprune.apply.refit import CompensationOptions, recipe

        return recipe(CompensationOptions(self.compensate, self.dataset, self.compensation_samples, self.seq_len,
                                          seed=self.seed, data_dir=self.data_dir), config)

    def eval_options(self) -> EvalOptions:
        return EvalOptions(self.eval_dataset, self.eval_seq_len, self.max_windows, data_dir=self.data_dir,
                           tasks=task_options(self.tasks, self.tasks_limit, self.tasks_dir))

    def finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(
            method=self.finetune_method,
            dataset=self.finetune_dataset or self.dataset,
            samples=self.finetune_samples,
            seq_len=self.finetune_seq_len,
            lr=self.finetune_lr,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            seed=self.seed,
            data_dir=self.data_dir,
            distill=distillation(self.base_model if self.teacher is None else self.teacher, self.kd_temperature,
                                 self.kd_weight, self.kd_top_k, self.kd_hidden, self.teacher_device),
        )

    @property
    def saves_model(self) -> bool:
        """A finetuned model is always saved: finetuning is only worth its time if its result is kept."""
        return self.save_model or self.finetune

    def description(self) -> dict:
        """The configuration for description.txt: every option, then what the seed's names resolved to."""
        config = {f.name: getattr(self, f.name) for f in fields(self)}
        config.update(
            run_dir=self.run_dir,
            criterion=self.importance_method.criterion,
            strategy=self.method.strategy.value,
        )
        return config


@dataclass(frozen=True)
class _Inputs:
    """The texts, read before any weights load so that bad data fails fast."""

    calibration: list[str]
    evaluation: list[str] | None
    training: object | None  # recover.data.TrainingText


def read_inputs(options: PruneOptions) -> _Inputs:
    """The texts, then the finetune's teacher against the model to prune (whose layers its plan will keep)."""
    from llamaprune.io.text_data import load_rows
    from llamaprune.recover.data import read_source
    from llamaprune.recover.teacher import check_teacher

    finetune = options.finetune_options()
    inputs = _Inputs(
        calibration=load_rows(options.dataset, split="train", data_dir=options.data_dir),
        evaluation=options.eval_options().test_rows() if options.test_after_prune else None,
        training=read_source(finetune.dataset, finetune.data_dir) if options.finetune else None,
    )
    if options.finetune:
        check_teacher(finetune.distill, options.base_model)
    return inputs


@flags_named(SEED_FLAGS)
def prune(options: PruneOptions, progress: bool = True) -> dict:
    """Run every phase into ``options.run_dir`` (atomically); returns the summary the manifest records."""
    with run_phase(options.phase, lambda _: read_inputs(options)) as run:
        _run(options, run, progress)
    return run.summary


def _run(options: PruneOptions, run: PhaseRun[_Inputs], progress: bool) -> None:
    from llamaprune.apply.command import apply_plan
    from llamaprune.evaluate.perplexity import compare
    from llamaprune.io.loading import load_model
    from llamaprune.scoring.command import score_entry, score_into
    from llamaprune.seed.outputs import write_seed_files

    inputs, out, summary = run.inputs, run.dir, run.summary
    start = time.perf_counter()
    loaded = load_model(options.base_model, options.dtype, options.device)
    load_seconds = time.perf_counter() - start
    evaluation = options.eval_options()
    measure = functools.partial(
        _measure, tokenizer=loaded.tokenizer, options=evaluation, rows=inputs.evaluation, progress=progress
    )
    result, manifest = score_into(out, options.score_options(), loaded, inputs.calibration, load_seconds, progress,
                                  run.checked.weights)
    manifest = with_history(manifest, score_entry(result))  # the scoring; this prune follows it
    plan, tables = _plan(options, out)
    t0 = time.perf_counter()
    compensation = options.compensation_options(loaded.model.config)
    done = compensation.compensate(plan, loaded.model.config, loaded=loaded, rows=inputs.calibration, run_dir=out,
                                   progress=progress)
    model = apply_plan(loaded.model, done.plan, done.tensors)
    # the seed's files show the groups removed, which obs selection chose in the compensation pass
    seed_files = write_seed_files(out, tables, done.plan, {**options.description(), "plan": plan.name})
    summary.update(
        options=plain_value(options.description()),
        plan=plan.name,
        target_ratio=plan.target_ratio,
        achieved_ratio=plan.achieved_ratio,
        params_before=plan.params_before,
        params_after=plan.params_after,
        seconds_score=round(result.seconds, 3),
        seconds_apply=round(time.perf_counter() - t0, 3),
        compensation=plain_value(compensation),
        seed_files=seed_files,
    )
    report = None
    if inputs.evaluation is not None:  # the dense and the pruned model (sharing tensors) are both in memory
        report = compare(evaluation, *measure_pair(loaded.model, model, loaded.tokenizer, evaluation,
                                                   inputs.evaluation, progress))
    curve = None
    if options.finetune:
        model, curve, summary["finetune"] = _finetune(
            model, loaded, done.plan, options, inputs.training, progress
        )
        if report:
            report.update(_recovery(report, measure(model)))
    model_dir = out / MODEL_DIR
    if options.saves_model:
        _save(model, loaded.tokenizer, model_dir, done.plan, curve)
        summary["model_dir"] = str(options.run_dir / MODEL_DIR)
    if report:
        summary["eval"] = report
        atomic_write_json((model_dir if options.saves_model else out) / EVAL_FILE, report)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    run.record(manifest)
    if options.saves_model:
        shutil.copyfile(out / MANIFEST, model_dir / MANIFEST)


def _plan(options: PruneOptions, out: Path):
    """Phase 2 from the tables just written, as ``llamaprune plan`` would: the plan and the run's tables."""
    from llamaprune.plan import load_run, make_plan, write_plans

    tables = load_run(out)
    plan = make_plan(tables, options.plan_options())
    write_plans(out, [plan])
    return plan, tables


def _measure(model, tokenizer, options: EvalOptions, rows: list[str] | None, progress: bool) -> dict | None:
    """Perplexity, speed and size of ``model`` (None when no evaluation was asked for)."""
    return None if rows is None else measure(model, tokenizer, options, rows, progress)


def _recovery(report: dict, finetuned: dict) -> dict:
    """The finetuned model's perplexity, and the share of the perplexity lost to pruning that it won back."""
    dense, pruned = report["before"]["ppl"], report["after"]["ppl"]
    lost = pruned - dense
    return {
        "finetuned": finetuned,
        "finetuned_ppl_ratio": finetuned["ppl"] / dense,
        "recovered_fraction": (pruned - finetuned["ppl"]) / lost if lost > 0 else None,
    }


def _finetune(model, dense, plan, options: PruneOptions, text, progress: bool):
    """Recovery finetuning in memory, distilled from the ``dense`` model already loaded (a LoadedModel) unless
    another teacher is asked for; returns the (LoRA-merged) model, its loss curve and a summary."""
    from llamaprune.recover.data import build_examples
    from llamaprune.recover.finetune import finetune, merge_lora
    from llamaprune.recover.teacher import load_teacher

    ft = options.finetune_options()
    teacher = None
    if ft.distill is not None:
        in_memory = ft.distill.teacher == options.base_model and ft.distill.device in (None, options.device)
        teacher = load_teacher(ft.distill, model, plan, options.dtype, dense.model if in_memory else None)
    examples = build_examples(dense.tokenizer, text, ft.samples, ft.seq_len, ft.seed)
    result = finetune(model, dense.tokenizer, ft, examples, progress, teacher)
    summary = {
        "method": ft.method.value,
        "learning_rate": ft.learning_rate,
        "data_kind": text.kind,
        "distill": plain_value(ft.distill),
        **result.summary(),
    }
    return merge_lora(result.model), result.curve, summary


def _save(model, tokenizer, model_dir: Path, plan, curve: dict | None) -> None:
    """The pruned (and finetuned) checkpoint, with its tokenizer, plan and loss curve."""
    from llamaprune.core.plan_file import write_plan
    from llamaprune.io.pruned_checkpoint import PLAN_FILE, save_pruned
    from llamaprune.recover.loss_curve import plot_curve

    save_pruned(model, model_dir)
    tokenizer.save_pretrained(model_dir)
    write_plan(plan, model_dir / PLAN_FILE)
    if curve is not None:
        atomic_write_json(model_dir / CURVE_JSON, curve)
        plot_curve(curve, model_dir / CURVE_PNG)


def summary_lines(summary: dict) -> list[str]:
    """What ``llamaprune prune`` prints at the end: ratio, parameters, perplexities, where things went."""
    before, after = summary["params_before"], summary["params_after"]
    lines = [
        f"plan {summary['plan']}: removed {summary['achieved_ratio']:.2%} of the parameters "
        f"(target {summary['target_ratio']:.2%}): {before:,} -> {after:,}",
    ]
    if "finetune" in summary:
        ft = summary["finetune"]
        lines.append(
            f"finetune {ft['method']}: {ft['steps']} steps over {ft['train_examples']} examples, "
            f"best validation loss {ft['best_validation_loss']:.4f} at step {ft['best_step']}"
        )
    report = summary.get("eval")
    if report:
        ppl = f"perplexity dense {report['before']['ppl']:.3f}, pruned {report['after']['ppl']:.3f}"
        if "finetuned" in report:
            ppl += f", finetuned {report['finetuned']['ppl']:.3f}"
        options = report["options"]
        lines.append(
            f"{ppl} ({options['dataset']}, {report['after']['windows']} windows of {options['seq_len']}); "
            f"{speed_text(report)}"
        )
        if options.get("tasks"):  # dense -> pruned (-> finetuned)
            lines += task_lines(report["before"], report["after"], *filter(None, [report.get("finetuned")]))
    if "model_dir" in summary:
        lines.append(f"model: {summary['model_dir']}")
    lines.append(f"done in {summary['seconds']:.1f} s")
    return lines
