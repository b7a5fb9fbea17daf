"""The step of ``score --after PLAN``: the model the plan leaves, compensated in memory by ``prune``'s recipe on the
score's own calibration text, for the score command to score (``scoring.after_plan`` maps its tables back onto
the original model's groups)."""

from __future__ import annotations

from pathlib import Path

from llamaprune.apply.command import apply_plan
from llamaprune.apply.refit import CompensationOptions, recipe
from llamaprune.core.plan_file import Plan
from llamaprune.core.tables import file_sha256
from llamaprune.scoring.in_memory import ScoreOptions


def compensate_step(loaded, plan: Plan, path: Path, options: ScoreOptions, rows: list[str],
                    progress: bool = True) -> tuple[object, Plan, dict]:
    """``loaded``'s model (a ``LoadedModel``) pruned by ``plan`` (at ``path``, which passed
    ``scoring.after_plan.check_after``) and refitted on ``options.after_samples`` windows of ``rows``; the plan as
    the refit's obs chose its groups; and the record of both for the run."""
    config = loaded.model.config
    compensation = recipe(CompensationOptions("lstsq", options.dataset, options.after_samples, options.seq_len,
                                              seed=options.seed, data_dir=options.data_dir), config)
    done = compensation.compensate(plan, config, loaded=loaded, rows=rows, run_dir=path.parent.parent,
                                   progress=progress)
    record = {"plan": {"path": str(path), "sha256": file_sha256(path), "name": plan.name,
                       "achieved_ratio": plan.achieved_ratio, "params_after": plan.params_after},
              "compensation": done.plan.selection or {}, "target": compensation.target.value,
              "residual_share": compensation.residual_share}
    return apply_plan(loaded.model, done.plan, done.tensors), done.plan, record
