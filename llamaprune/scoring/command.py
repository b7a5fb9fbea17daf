"""``llamaprune score``: load the model, draw calibration windows, score them, and write the run directory
(tables, stats, manifest and log; docs/ARTIFACTS.md). ``llamaprune.scoring.in_memory`` holds the scoring itself.

    >>> result = score_run(ScoreOptions("smollm2-135m", num_samples=32), Path("artifacts/run1"))  # doctest: +SKIP
    >>> result.groups.num_rows, result.peak_memory_scope                                        # doctest: +SKIP
    (46170, 'scoring')
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llamaprune.core.artifacts import SCHEMA_VERSION, new_manifest, plain_value
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.tables import GROUPS_FILE, LAYERS_FILE, write_table
from llamaprune.io.loading import resolve_device
from llamaprune.runs.phase import Checked, Phase, preflight, run_phase
from llamaprune.scoring.collectives import Ranks
from llamaprune.scoring.in_memory import STATS_FILE, ScoreOptions, ScoreResult, score
from llamaprune.scoring.sharded import check_fsdp_torch

log = logging.getLogger(__name__)


def write_tables(out: Path, result: ScoreResult) -> None:
    """groups.parquet, layers.parquet and stats.safetensors (where the result has stats) into ``out``."""
    from llamaprune.io.weights import save_file

    write_table(result.groups, out / GROUPS_FILE)
    write_table(result.layers, out / LAYERS_FILE)
    if result.stats is not None:
        save_file(result.stats, out / STATS_FILE, metadata={"schema_version": str(SCHEMA_VERSION)})


def score_entry(result: ScoreResult) -> dict:
    """The manifest history's record of a scoring."""
    return {"command": "score", "seconds": result.seconds}


# score --after's step (``apply.step.compensate_step``, handed down by the command: scoring imports nothing of
# apply): (loaded model, plan, its path, options, calibration rows, progress) -> (compensated model, the plan as
# its refit chose it, the record of both)
Step = Callable[..., tuple[object, object, dict]]


def score_into(out: Path | None, options: ScoreOptions, loaded, rows: list[str], load_seconds: float,
               progress: bool = True, weights: str | None = None, config=None,
               ranks: Ranks | None = None, step: Step | None = None) -> tuple[ScoreResult, dict]:
    """Score an already loaded model on calibration windows drawn from ``rows`` and write the tables into
    ``out`` (None: a process of a distributed run other than the first, which writes nothing); returns the
    result and the run's new manifest, for the command to record. ``weights``: the checkpoint's fingerprint,
    recorded in both. With ``options.stream``, ``loaded`` has no model: the layers of its source (``config``'s)
    are read one at a time (``llamaprune.scoring.streamed``). With ``options.after``, ``step`` gives the model
    scored (``scoring.after_plan``)."""
    from llamaprune.io.loading import torch_dtype
    from llamaprune.io.text_data import calibration_windows
    from llamaprune.scoring.calibration import gradient_groups
    from llamaprune.scoring.collectives import share
    from llamaprune.scoring.sharded import is_sharded, sharded_groups
    from llamaprune.scoring.streamed import score_streamed

    windows = calibration_windows(loaded.tokenizer, rows, options.num_samples, options.seq_len, options.seed,
                                  flag("score --seq-len"))
    calibration = {
        "source": options.dataset,
        "n_samples": options.num_samples,
        "seq_len": options.seq_len,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "fisher_windows": options.fisher_windows,
    }
    log.info("scoring %s with %s on %d x %d tokens", options.model, ",".join(options.criteria),
             options.num_samples, options.seq_len)
    if options.stream:
        result = score_streamed(Path(loaded.source.path), config, windows, options.criteria, options.seed,
                                calibration, torch_dtype(options.dtype), resolve_device(options.device),
                                options.batch_size, progress, weights)
    else:
        if is_sharded(loaded.model):
            groups = sharded_groups(windows, options.fisher_windows, ranks)
        else:
            groups = share(gradient_groups(windows, options.fisher_windows, options.batch_size), ranks)
        if options.after is not None:
            if step is None:
                raise ValueError("score --after needs the step's compensation (apply.step.compensate_step)")
            from llamaprune.core.plan_file import read_plan
            from llamaprune.scoring.after_plan import AFTER, in_original_groups

            path = Path(options.after)
            model, plan, record = step(loaded, read_plan(path), path, options, rows, progress)
            result = in_original_groups(score(model, groups, options.criteria, options.seed, calibration, progress,
                                              weights, options.accumulate), plan, loaded.model.config, record)
        else:
            result = score(loaded.model, groups, options.criteria, options.seed, calibration,
                           progress and (ranks is None or ranks.main), weights, options.accumulate, ranks)
    if out is None:
        return result, {}
    write_tables(out, result)
    model = {
        "source": options.model,
        "path": loaded.source.path,
        "gguf_file": loaded.source.gguf_file,
        "fingerprint": result.meta["fingerprint"],
        "weights_fingerprint": weights,
    }
    manifest = new_manifest(
        model,
        params=result.meta["params"],
        calibration=calibration,
        criteria=list(options.criteria),
        options=plain_value(options),
        timings={"load_seconds": load_seconds, "score_seconds": result.seconds},
        peak_memory_bytes=result.peak_memory_bytes,
        peak_memory_scope=result.peak_memory_scope,
        accumulators={"dtype": options.accumulate.value, "bytes": result.accumulator_bytes},
        processes={"count": ranks.world if ranks else 1, "fsdp": options.fsdp},
        **({AFTER: result.meta[AFTER]} if options.after is not None else {}),
    )
    return result, manifest


def score_run(options: ScoreOptions, out: Path, overwrite: bool = False, step: Step | None = None) -> ScoreResult:
    """The ``llamaprune score`` command: load (with ``options.stream``, the config and tokenizer only), sample
    calibration windows, score, write ``out`` atomically. Under torchrun every process checks its input and
    scores its share; the first one writes ``out``. ``step``: the compensation of ``options.after``'s plan."""
    from llamaprune.io.loading import resolve_source
    from llamaprune.io.text_data import load_rows, local_file
    from llamaprune.scoring.collectives import agree, process_group, ranks_from_env
    from llamaprune.scoring.streamed import check_source

    ranks = ranks_from_env()
    if options.fsdp:
        check_fsdp_torch()
    if options.fsdp and ranks is None:
        raise UsageError("--fsdp shards the model across the processes of a torchrun job; launch it with "
                         "`torchrun --nproc-per-node N -m llamaprune score ...`, or drop --fsdp")
    if options.after is not None and ranks is not None:
        raise UsageError("--after refits and scores the compensated model in one process; run it without torchrun")
    if options.stream and ranks is not None:
        raise UsageError("--stream scores in one process, one layer at a time; run it without torchrun")
    if options.stream:  # before the pre-flight, which would try to reach a hub id
        check_source(resolve_source(options.model))
    phase = Phase("score", Path(out), overwrite, options.model, options.device,
                  inputs=(local_file(options.dataset, "train", options.data_dir),
                          *((Path(options.after), Path(options.after).parent.parent / GROUPS_FILE)
                            if options.after is not None else ())),
                  seq_lens=((flag("score --seq-len"), options.seq_len),))
    main = ranks is None or ranks.main
    with process_group(ranks, resolve_device(options.device)):
        checked, error = None, None
        try:  # only the first process checks (and sweeps) the output; every one checks what it reads
            checked = preflight(phase if main else replace(phase, in_place=True),
                                lambda _: load_rows(options.dataset, split="train", data_dir=options.data_dir))
        except UsageError as err:
            error = err
        if options.after is not None and checked is not None:
            from llamaprune.core.plan_file import read_plan
            from llamaprune.scoring.after_plan import check_after

            check_after(read_plan(Path(options.after)), Path(options.after), checked.config, checked.weights)
        agree(ranks, error)
        if not main:
            return score_into(None, options, _load(options, checked, ranks), checked.inputs, 0.0,
                              weights=checked.weights, config=checked.config, ranks=ranks)[0]
        with run_phase(phase, checked=checked) as run:
            start = time.perf_counter()
            loaded = _load(options, checked, ranks)
            result, manifest = score_into(run.dir, options, loaded, run.inputs, time.perf_counter() - start,
                                          weights=run.checked.weights, config=checked.config, ranks=ranks,
                                          step=step)
            run.summary.update(score_entry(result))
            run.record(manifest)
    return result


def _load(options: ScoreOptions, checked: Checked, ranks: Ranks | None):
    """The model on this process's device; under --fsdp, only this process's shard of each parameter; with
    --stream, none (its layers are read in turn)."""
    from llamaprune.io.loading import LoadedModel, load_model, load_tokenizer, torch_dtype
    from llamaprune.scoring.sharded import load_sharded

    if options.stream:
        return LoadedModel(None, load_tokenizer(checked.source), checked.source)
    if not options.fsdp:
        return load_model(options.model, options.dtype, options.device)
    source = checked.source
    if source.kind != "dir" or source.gguf_file:
        raise UsageError(f"--fsdp reads each process's shard from a safetensors checkpoint directory, and "
                         f"{options.model} is not one; save it with `save_pretrained` and score that directory")
    model = load_sharded(Path(source.path), checked.config, torch_dtype(options.dtype),
                         resolve_device(options.device), ranks)
    return LoadedModel(model, load_tokenizer(source), source)
