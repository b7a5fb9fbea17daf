"""Phase 1 for the forward-only criteria with one decoder layer in memory at a time (``llamaprune score --stream``).

The calibration windows' hidden states go through a safetensors checkpoint layer by layer
(``llamaprune.io.layer_stream``): each layer is read, the same hooks as the whole-model pass
(``scoring.calibration.layer_hooks``) fold its inputs and block influence while the hidden states pass through it, its
groups are scored while its weights are loaded, and it is dropped. Peak memory is about one layer plus the
activations, not the model; the tables and stats are those of ``scoring.in_memory.score`` on the same windows.

    >>> result = score_streamed(Path("ckpt"), config, windows, ("wanda", "magnitude"))   # doctest: +SKIP
    >>> result.groups.column_names[-2:]                                                  # doctest: +SKIP
    ['wanda', 'magnitude']
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llamaprune.core.criteria import FORWARD_ONLY, parse_criteria
from llamaprune.core.errors import UsageError
from llamaprune.core.groups import model_shape
from llamaprune.io.layer_stream import LayerStream, trim_heap, unmap_large_frees
from llamaprune.io.loading import Source
from llamaprune.io.weights import safetensors_files
from llamaprune.runs.peak_memory import PeakMemory
from llamaprune.scoring.accumulators import Accumulators
from llamaprune.scoring.calibration import layer_hooks, layer_param_specs
from llamaprune.scoring.in_memory import (
    ScoreResult,
    check_finite,
    check_streamable,
    param_group_scores,
    score_result,
    statistics_of,
    table_meta,
    table_scores,
)


def check_source(source: Source) -> None:
    """Layers are read from safetensors files: the model must be a local checkpoint directory that has them."""
    if source.kind == "dir" and safetensors_files(Path(source.path)):
        return
    what = {"gguf": "a GGUF file", "hub": "a hub id"}.get(source.kind, "a directory without safetensors weights")
    raise UsageError(
        f"--stream reads one layer at a time from a local safetensors checkpoint directory, and {source.name} is "
        f"{what}; pass such a directory (e.g. one written by `save_pretrained`), or drop --stream"
    )


def score_streamed(path: Path, config, windows: torch.Tensor, criteria: tuple[str, ...] = FORWARD_ONLY,
                   seed: int = 0, calibration: dict | None = None, dtype: torch.dtype = torch.float32,
                   device: str = "cpu", batch_size: int = 8, progress: bool = True,
                   weights_fingerprint: str | None = None) -> ScoreResult:
    """Score every group of the safetensors checkpoint directory ``path`` (of ``config``) over ``windows``
    ((n, L) token ids, run ``batch_size`` at a time), its layers read one at a time in ``dtype`` onto
    ``device``. The peak memory and seconds cover the whole pass, reading the weights included."""
    from tqdm.auto import tqdm

    criteria = parse_criteria(",".join(criteria))
    check_streamable(criteria)
    shape = model_shape(config)
    statistics = statistics_of(criteria)
    unmap_large_frees()  # a layer's temporaries go back to the OS when freed, not to the heap
    trim_heap()  # tokenizing the calibration text leaves tens of MB of freed heap behind
    peak = PeakMemory(device, "scoring")
    start = time.perf_counter()
    stream = LayerStream.from_checkpoint(Path(path), config, dtype, batch_size, device, head=False)
    acc = Accumulators(tokens=windows.numel())
    scores = {}
    hidden = stream.embed(windows)
    for layer, layer_shape in enumerate(tqdm(shape.layers, desc="score", unit="layer", disable=not progress)):
        with stream.layer(layer) as block:
            handles = layer_hooks(block, layer, layer_shape, acc, statistics)
            try:
                hidden = stream.run_layer(block, hidden)
            finally:
                for handle in handles:
                    handle.remove()
            scores.update(param_group_scores(layer_param_specs(block, layer, layer_shape), acc, criteria))
    scores.update(table_scores(shape, criteria, seed))
    check_finite(scores)
    seconds = time.perf_counter() - start
    meta = table_meta(config, shape, criteria, calibration, weights_fingerprint)
    return score_result(shape, [], scores, acc, meta, seconds, *peak.read())
