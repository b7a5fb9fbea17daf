"""The teacher of ``finetune --teacher``: checked against the student before any weights load, then loaded (or
taken from memory), with the student's decoder layers matched to the teacher's through the plan.

Distillation compares the two next-token distributions token by token, so the teacher must have the student's
vocabulary (size and tokenizer) and family; the hidden-state loss also needs to know which teacher layer each
student layer was cut from, which the plan the student was pruned by says (its removed layers).

    >>> settings = Distillation("smollm2-135m")
    >>> check_teacher(settings, "pruned", checkpoint_plan(Path("pruned")))              # doctest: +SKIP
    >>> teacher = load_teacher(settings, student, checkpoint_plan(Path("pruned")))      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from llamaprune.core.arch import source_model_type
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.plan_file import Plan, read_plan
from llamaprune.io.loading import DType
from llamaprune.io.pruned_checkpoint import PLAN_FILE
from llamaprune.recover.distill import Distillation, Teacher

FIX = "distil from the model it was pruned from"


def checkpoint_plan(path: Path) -> Plan | None:
    """The plan a pruned checkpoint directory was made by (its plan.json), None where it has none."""
    plan_file = Path(path) / PLAN_FILE
    return read_plan(plan_file) if plan_file.is_file() else None


def check_configs(settings: Distillation, student, teacher, student_name: str) -> None:
    """Refuse a teacher of another family or vocabulary size than the student (their configs), or a top k
    beyond its vocabulary."""
    name, option = settings.teacher, flag("finetune --teacher")
    student_type, teacher_type = source_model_type(student), source_model_type(teacher)
    if student_type != teacher_type:
        raise UsageError(f"{option} {name} is a {teacher_type} model and {student_name} a {student_type} one; "
                         f"distillation needs a teacher of the student's family: {FIX}")
    if student.vocab_size != teacher.vocab_size:
        raise UsageError(f"{option} {name} has a vocabulary of {teacher.vocab_size:,} tokens and {student_name} "
                         f"{student.vocab_size:,}; distillation compares the two token by token: {FIX}")
    if settings.top_k is not None and settings.top_k > teacher.vocab_size:
        raise UsageError(f"{flag('finetune --kd-top-k')} {settings.top_k} is more than the teacher's vocabulary of "
                         f"{teacher.vocab_size:,} tokens")


def layer_map(settings: Distillation, plan: Plan | None, student, teacher, student_layers: int | None = None
              ) -> tuple[int, ...]:
    """The teacher's layer each student layer was cut from: the layers the plan kept (the same layers where the
    student has no plan); empty without the hidden-state loss. ``student_layers``: the student's layer count,
    where ``student`` is the config of the model a plan is yet to prune."""
    if not settings.hidden:
        return ()
    option, name = flag("finetune --kd-hidden"), settings.teacher
    count = student.num_hidden_layers if student_layers is None else student_layers
    if student.hidden_size != teacher.hidden_size:
        raise UsageError(f"{option} compares hidden states, but {name} has a hidden size of {teacher.hidden_size} "
                         f"and the student {student.hidden_size}: {FIX}, or leave {option} out")
    if plan is None:
        if count != teacher.num_hidden_layers:
            raise UsageError(f"{option} matches the student's layers to the teacher's, but the student has {count} "
                             f"layers, {name} {teacher.num_hidden_layers}, and no {PLAN_FILE} says which were "
                             f"removed; {FIX}, or leave {option} out")
        return tuple(range(count))
    kept = tuple(lp.layer for lp in plan.layers if not lp.removed)
    if len(plan.layers) != teacher.num_hidden_layers or len(kept) != count:
        raise UsageError(f"{option} matches layers through the plan {plan.name}, which keeps {len(kept)} of "
                         f"{len(plan.layers)} layers, but the student has {count} and {name} "
                         f"{teacher.num_hidden_layers}: {FIX}, or leave {option} out")
    return kept


def check_teacher(settings: Distillation | None, student: str, plan: Plan | None = None,
                  student_layers: int | None = None) -> None:
    """Before any weights load: refuse a teacher (model source, device, weight files) that cannot teach the model
    ``student`` (the checkpoint to finetune, or the model a plan is to prune, with the plan and the layer count it
    leaves): another family, vocabulary size or tokenizer, or layers the hidden-state loss cannot match."""
    if settings is None:
        return
    from llamaprune.io.loading import load_config, load_tokenizer, resolve_source
    from llamaprune.runs.phase import check_model

    student_source = resolve_source(student)
    student_config = load_config(student_source)
    if settings.device is not None or settings.teacher != student:
        checked = check_model(settings.teacher, settings.device or "cpu")
        teacher_config = checked.config
        check_configs(settings, student_config, teacher_config, student)
        if load_tokenizer(checked.source).get_vocab() != load_tokenizer(student_source).get_vocab():
            raise UsageError(f"{flag('finetune --teacher')} {settings.teacher} has another tokenizer than "
                             f"{student} (the same number of tokens, other strings): {FIX}")
    else:
        teacher_config = student_config
    layer_map(settings, plan, student_config, teacher_config, student_layers)


def load_teacher(settings: Distillation, student, plan: Plan | None, dtype: DType = DType.float32,
                 model=None) -> Teacher:
    """The teacher for ``student`` (a loaded causal LM): ``model`` where it is already in memory, else loaded from
    ``settings.teacher`` in ``dtype`` on its device (the student's where none is given), in eval mode."""
    from llamaprune.io.loading import load_model

    if model is None:
        device = settings.device or next(student.parameters()).device.type
        model = load_model(settings.teacher, dtype, device).model
    check_configs(settings, student.config, model.config, "the student")
    return Teacher(model.eval(), settings, layer_map(settings, plan, student.config, model.config))


def own_tensors(student, teacher) -> None:
    """Give ``student`` its own copy of every weight it shares with ``teacher`` (a model pruned in memory shares
    the tensors the plan did not cut with its source), so that training every weight leaves the teacher as it
    was. A tied weight stays tied: its one Parameter gets the copy."""
    shared = {param.data_ptr() for param in teacher.parameters()}
    for param in student.parameters():
        if param.data_ptr() in shared:
            param.data = param.data.clone()
