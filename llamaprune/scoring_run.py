"""``llamaprune score``: load the model, draw calibration windows, score them, and write the run directory
(tables, stats, manifest and log; docs/ARTIFACTS.md). ``llamaprune.scoring`` holds the scoring itself.

    >>> result = score_run(ScoreOptions("smollm2-135m", num_samples=32), Path("artifacts/run1"))  # doctest: +SKIP
    >>> result.groups.num_rows, result.peak_memory_scope                                        # doctest: +SKIP
    (46170, 'scoring')
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from llamaprune.artifacts import SCHEMA_VERSION, new_manifest, plain_value
from llamaprune.runs import Phase, run_phase
from llamaprune.scoring import STATS_FILE, ScoreOptions, ScoreResult, score
from llamaprune.table import GROUPS_FILE, LAYERS_FILE, write_table

log = logging.getLogger(__name__)


def write_tables(out: Path, result: ScoreResult) -> None:
    """groups.parquet, layers.parquet and stats.safetensors into ``out``."""
    from safetensors.torch import save_file

    write_table(result.groups, out / GROUPS_FILE)
    write_table(result.layers, out / LAYERS_FILE)
    save_file(result.stats, str(out / STATS_FILE), metadata={"schema_version": str(SCHEMA_VERSION)})


def score_entry(result: ScoreResult) -> dict:
    """The manifest history's record of a scoring."""
    return {"command": "score", "seconds": result.seconds}


def score_into(out: Path, options: ScoreOptions, loaded, rows: list[str], load_seconds: float,
               progress: bool = True, weights: str | None = None, config=None) -> tuple[ScoreResult, dict]:
    """Score an already loaded model on calibration windows drawn from ``rows`` and write the tables into
    ``out``; returns the result and the run's new manifest, for the command to record. ``weights``: the
    checkpoint's fingerprint, recorded in both. With ``options.stream``, ``loaded`` has no model: the layers of
    its source (``config``'s) are read one at a time (``llamaprune.scoring_stream``)."""
    from llamaprune.calibrate import gradient_groups
    from llamaprune.data import calibration_windows
    from llamaprune.model import resolve_device, torch_dtype
    from llamaprune.scoring_stream import score_streamed

    windows = calibration_windows(loaded.tokenizer, rows, options.num_samples, options.seq_len, options.seed)
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
        groups = gradient_groups(windows, options.fisher_windows, options.batch_size)
        result = score(loaded.model, groups, options.criteria, options.seed, calibration, progress, weights)
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
    )
    return result, manifest


def score_run(options: ScoreOptions, out: Path, overwrite: bool = False) -> ScoreResult:
    """The ``llamaprune score`` command: load (with ``options.stream``, the config and tokenizer only), sample
    calibration windows, score, write ``out`` atomically."""
    from llamaprune.data import load_rows, local_file
    from llamaprune.model import LoadedModel, load_model, load_tokenizer, resolve_source
    from llamaprune.scoring_stream import check_source

    if options.stream:  # before the pre-flight, which would try to reach a hub id
        check_source(resolve_source(options.model))
    phase = Phase("score", Path(out), overwrite, options.model, options.device,
                  inputs=(local_file(options.dataset, "train", options.data_dir),),
                  seq_lens=(("--seq-len", options.seq_len),))
    with run_phase(phase, lambda _: load_rows(options.dataset, split="train", data_dir=options.data_dir)) as run:
        start = time.perf_counter()
        source = run.checked.source
        loaded = (LoadedModel(None, load_tokenizer(source), source) if options.stream
                  else load_model(options.model, options.dtype, options.device))
        result, manifest = score_into(run.dir, options, loaded, run.inputs, time.perf_counter() - start,
                                      weights=run.checked.weights, config=run.checked.config)
        run.summary.update(score_entry(result))
        run.record(manifest)
    return result
