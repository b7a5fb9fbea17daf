"""Distillation from the dense model (finetune --teacher): the KL and its gradient vanish for the same model, chunks
change nothing, top-k is the KL to the teacher's renormalized top k, a KD finetune brings a pruned model closer to
its teacher, and a teacher of another vocabulary or family is refused in one line before any training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VALID_TXT, assert_one_error_line, tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llamaprune.apply.command import apply_plan
from llamaprune.cli.app import app
from llamaprune.core.artifacts import read_manifest
from llamaprune.core.plan_file import plan_from_kept, write_plan
from llamaprune.recover.data import IGNORE_INDEX, build_examples, collate, read_source, split_validation
from llamaprune.recover.distill import Distillation, Teacher, batch_sums
from llamaprune.recover.finetune import FinetuneOptions, finetune, merge_lora, token_nll
from llamaprune.recover.teacher import load_teacher, own_tensors

VOCAB = 48


def batch(seed: int = 0, size: int = 3, length: int = 12) -> dict:
    """Random windows, the last one padded and its first labels ignored (a prompt), as ``collate`` makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[-1, :3] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair(layers: int = 2, seed: int = 0):
    """A tiny student in train mode and a teacher with the same weights."""
    student = tiny_model(tiny_config(vocab=VOCAB, layers=layers), seed).train()
    return student, copy.deepcopy(student).eval()


def sums(student, teacher, data, chunk=None, weight=1.0, **settings):
    """The losses of ``data``; by default of the KL alone (no share for the next-token loss)."""
    return batch_sums(student, Teacher(teacher, Distillation("teacher", weight=weight, **settings), (0, 1)), data,
                      torch.device("cpu"), chunk)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_kl_and_its_gradient_are_zero_for_the_same_model(temperature):
    student, teacher = pair()
    result = sums(student, teacher, batch(), chunk=5, temperature=temperature, hidden=1.0)
    result.objective.backward()
    assert result.kl.item() == 0 and result.hidden.item() == 0
    assert max(g.abs().max().item() for g in grads(student)) < 1e-6  # Σp is 1 within float32 rounding
    with torch.no_grad():  # another student: both are positive, and so is the gradient
        next(student.parameters()).add_(0.05)
    student.zero_grad()
    result = sums(student, teacher, batch(), chunk=5, temperature=temperature, hidden=1.0)
    result.objective.backward()
    assert result.kl.item() > 1e-4 and result.hidden.item() > 1e-4
    assert max(g.abs().max().item() for g in grads(student)) > 1e-3


@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_losses_and_gradients_equal_one_chunk(top_k):
    student, _ = pair(seed=1)
    teacher = tiny_model(tiny_config(vocab=VOCAB), seed=2)
    data = batch(1)
    results, gradients = [], []
    for chunk in (1, 4, 1000):  # one position at a time, uneven chunks, the whole sequence
        student.zero_grad()
        result = sums(student, teacher, data, chunk, temperature=2.0, weight=0.7, top_k=top_k, hidden=0.5)
        result.objective.backward()
        results.append(result)
        gradients.append(grads(student))
    for result, gradient in zip(results[:2], gradients[:2], strict=True):
        for key in ("objective", "kl", "nll", "hidden"):
            assert getattr(result, key).item() == pytest.approx(getattr(results[-1], key).item(), rel=1e-5)
        assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(gradient, gradients[-1], strict=True))
    # the NLL is the LM loss's, over the same predicted tokens
    with torch.no_grad():
        nll, tokens = token_nll(student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
                                data["labels"])
    assert results[-1].nll.item() == pytest.approx(nll.item(), rel=1e-5) and results[-1].tokens == tokens


def reference_kl(student_logits, teacher_logits, labels, temperature: float, top_k: int | None) -> float:
    """Σ over predicted tokens of KL(p ‖ q) written out over the whole vocabulary in float64: p the teacher's
    distribution at the temperature, kept on its top k tokens and renormalized, q the student's."""
    p = torch.softmax(teacher_logits[:, :-1].double() / temperature, -1)
    if top_k is not None:
        p = p * (p >= p.topk(top_k, -1).values[..., -1:])
        p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(student_logits[:, :-1].double() / temperature, -1)
    terms = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1)
    return float(terms[labels[:, 1:] != IGNORE_INDEX].sum()) * temperature**2


@pytest.mark.parametrize(("top_k", "temperature"), [(None, 1.0), (3, 1.0), (7, 2.0), (VOCAB, 1.5)])
def test_the_kl_equals_a_reference_written_directly(top_k, temperature):
    student, _ = pair(seed=3)
    teacher = tiny_model(tiny_config(vocab=VOCAB), seed=4)
    data = batch(2)
    with torch.no_grad():
        result = sums(student.eval(), teacher, data, 5, temperature=temperature, top_k=top_k)
        expected = reference_kl(student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
                                teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
                                data["labels"], temperature, top_k)
    assert result.kl.item() == pytest.approx(expected, rel=1e-5)
    assert result.objective.item() == pytest.approx(expected, rel=1e-5)  # weight 1: the KL alone


def test_an_f_kl_cross_check_of_the_reference():
    """The reference agrees with torch's own KL where no top k cuts the teacher."""
    student, teacher = torch.randn(2, 6, VOCAB), torch.randn(2, 6, VOCAB)
    labels = torch.zeros(2, 6, dtype=torch.long)
    torch_kl = F.kl_div(F.log_softmax(student[:, :-1], -1), F.log_softmax(teacher[:, :-1], -1), log_target=True,
                        reduction="sum")
    assert reference_kl(student, teacher, labels, 1.0, None) == pytest.approx(torch_kl.item(), rel=1e-5)


# ---------------------------------------------------------------- finetuning with a teacher


@pytest.fixture
def train_txt(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(VALID_TXT.read_text(encoding="utf-8").splitlines()[:300]), encoding="utf-8")
    return path


def compensated(tokenizer):
    """A tiny dense model and its pruned copy, pruned in memory as ``prune`` does (sharing the tensors the plan did
    not cut): layer 0 narrowed, layer 1 removed, layer 2 without attention, refitted by lstsq (output biases)."""
    from llamaprune.apply.refit import CompensationOptions
    from llamaprune.io.loading import LoadedModel, Source

    config = tiny_config(vocab=len(tokenizer), layers=3)
    dense = tiny_model(config)
    with torch.no_grad():  # a confident teacher, far from the uniform guess of a random head
        dense.lm_head.weight.mul_(20)
    plan = plan_from_kept(config, [([0], list(range(0, 24, 2))), ([0], [0]), ([], list(range(16)))], removed={1})
    compensation = CompensationOptions("lstsq", str(VALID_TXT), num_samples=8, seq_len=16)
    done = compensation.compensate(plan, config, loaded=LoadedModel(dense, tokenizer, Source("m", "dir", "")),
                                   rows=compensation.rows(None, plan.criterion), run_dir=None, progress=False)
    return dense, apply_plan(dense, plan, done.tensors), plan


def validation_kl(student, teacher: Teacher, tokenizer, opts: FinetuneOptions) -> float:
    """The KL per token to the teacher on the batch ``finetune`` holds out (rebuilt from the same seeded calls)."""
    examples = build_examples(tokenizer, read_source(opts.dataset), opts.samples, opts.seq_len, opts.seed)
    held_out = collate(split_validation(examples, opts.val_fraction, opts.batch_size, opts.seed)[1], 0)
    with torch.no_grad():
        result = batch_sums(student.eval(), teacher, held_out, torch.device("cpu"))
    return result.kl.item() / result.tokens


@pytest.mark.parametrize(("method", "settings"), [
    (dict(method="lora", lr=1e-2, lora_r=4, lora_alpha=8, gradient_checkpointing=True), dict(weight=1.0)),
    (dict(method="full", lr=1e-3), dict(temperature=2.0, weight=1.0, hidden=0.5)),
], ids=["lora-checkpointing", "full-hidden"])
def test_a_kd_finetune_brings_a_compensated_pruned_model_closer_to_its_teacher(tokenizer, train_txt, method,
                                                                               settings):
    dense, student, plan = compensated(tokenizer)
    assert student.config.output_bias and student.config.num_hidden_layers == 2
    before = {name: p.clone() for name, p in dense.state_dict().items()}
    opts = FinetuneOptions(dataset=str(train_txt), samples=48, seq_len=32, val_every=2, epochs=2, **method,
                           distill=Distillation("dense", **settings))
    teacher = load_teacher(opts.distill, student, plan, model=dense)
    assert teacher.layers == ((0, 2) if settings.get("hidden") else ())
    start = validation_kl(student, teacher, tokenizer, opts)
    result = finetune(student, tokenizer, opts, progress=False, teacher=teacher)
    trained = merge_lora(result.model)
    assert validation_kl(trained, teacher, tokenizer, opts) < 0.9 * start
    validation = result.curve["validation"]
    assert result.best["loss"] == min(p["loss"] for p in validation) < validation[0]["loss"]
    assert all("lm_loss" in p for p in validation + result.curve["train"])
    # the teacher, which shares the uncut tensors with the student, is untouched by training
    assert all(torch.equal(before[name], p) for name, p in dense.state_dict().items())


def test_a_teacher_sharing_tensors_with_a_fully_trained_student_keeps_its_own():
    student, teacher = pair()
    student.load_state_dict(teacher.state_dict(), assign=True)  # the same tensors, as prune's in-memory apply
    shared = next(student.parameters())
    assert shared.data_ptr() == next(teacher.parameters()).data_ptr()
    own_tensors(student, teacher)
    assert not {p.data_ptr() for p in student.parameters()} & {p.data_ptr() for p in teacher.parameters()}
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))


# ---------------------------------------------------------------- the commands


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def saved(path, tokenizer, config):
    tiny_model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any model load fails the test: refusals come before the weights, let alone training."""
    import llamaprune.recover.command as command

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(command, "load_model", refuse)


@pytest.mark.parametrize(("teacher", "fragment"), [
    (dict(vocab=100), "has a vocabulary of 100 tokens and"),
    (dict(model_type="qwen2"), "is a qwen2 model and"),
])
def test_a_teacher_of_another_vocabulary_or_family_is_one_line_before_any_training(
    tmp_path, tokenizer, tiny_checkpoint, train_txt, no_weights_load, teacher, fragment
):
    config = tiny_config(**{"vocab": len(tokenizer), **teacher})
    other = saved(tmp_path / "teacher", tokenizer, config)
    result = run("finetune", tiny_checkpoint, "--out", tmp_path / "out", "--dataset", train_txt, "--teacher", other)
    assert_one_error_line(result, f"--teacher {other} {fragment}", "distil from the model it was pruned from")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, tokenizer, tiny_checkpoint,
                                                                     train_txt, no_weights_load):
    other = saved(tmp_path / "teacher", tokenizer, tiny_config(vocab=len(tokenizer)))
    vocab = json.loads((other / "tokenizer.json").read_text())
    tokens = vocab["model"]["vocab"]
    first, second = sorted(tokens, key=tokens.get)[100:102]
    tokens[first], tokens[second] = tokens[second], tokens[first]  # two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    result = run("finetune", tiny_checkpoint, "--out", tmp_path / "out", "--dataset", train_txt, "--teacher", other)
    assert_one_error_line(result, "has another tokenizer than")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--kd-weight", 0.7], "--kd-weight is a setting of distillation, which needs a teacher: give --teacher"),
    (["--teacher", "none", "--kd-top-k", 4], "--kd-top-k is a setting of distillation"),
    (["--teacher", "T", "--kd-temperature", 0], "--kd-temperature must be positive"),
    (["--teacher", "T", "--kd-weight", 1.5], "--kd-weight is the KD's share of the loss, in [0, 1]"),
    (["--teacher", "T", "--kd-weight", 0], "--kd-weight 0 without --kd-hidden leaves the teacher nothing"),
    (["--teacher", "T", "--kd-top-k", 0], "--kd-top-k must be positive"),
    (["--teacher", "T", "--kd-top-k", 10_000], "--kd-top-k 10000 is more than the teacher's vocabulary of 320"),
    (["--teacher", "T", "--kd-hidden", 1], "--kd-hidden matches the student's layers to the teacher's, but the "
                                           "student has 2 layers, T 3"),
])
def test_bad_distillation_settings_are_one_line(tmp_path, tokenizer, tiny_checkpoint, train_txt, no_weights_load,
                                                args, fragment):
    three = saved(tmp_path / "three", tokenizer, tiny_config(vocab=len(tokenizer), layers=3))
    args = [str(three) if a == "T" else a for a in args]
    result = run("finetune", tiny_checkpoint, "--out", tmp_path / "out", "--dataset", train_txt, *args)
    assert_one_error_line(result, fragment.replace(" T ", f" {three} "))


def kd_flags(seed: bool) -> list:
    names = ("--kd_temperature", "--kd_top_k", "--kd_hidden") if seed else ("--kd-temperature", "--kd-top-k",
                                                                             "--kd-hidden")
    return [names[0], 2.0, names[1], 5, names[2], 0.5]


def spy_on(monkeypatch, module) -> dict:
    """The options and teacher that ``module.finetune`` is called with (then it trains as usual)."""
    seen, real = {}, module.finetune

    def spy(model, tokenizer, options, examples=None, progress=True, teacher=None):
        seen.update(options=options, teacher=teacher)
        return real(model, tokenizer, options, examples, progress, teacher)

    monkeypatch.setattr(module, "finetune", spy)
    return seen


def check_distilled(seen: dict, teacher: str, kept: tuple[int, ...], history: dict) -> None:
    expected = Distillation(teacher, temperature=2.0, top_k=5, hidden=0.5)
    assert seen["options"].distill == expected == seen["teacher"].settings
    assert seen["teacher"].layers == kept
    assert history["distill"] == {"teacher": teacher, "temperature": 2.0, "weight": 0.5, "top_k": 5, "hidden": 0.5,
                                  "device": None}


def test_apply_finetune_distils_from_the_source_by_default(tmp_path, tokenizer, tiny_checkpoint, train_txt,
                                                           monkeypatch):
    import llamaprune.recover.command as command

    config = tiny_config(vocab=len(tokenizer), layers=2)
    plan = plan_from_kept(config, [([0], [1, 2, 3]), ([1], [4])], removed={0})
    write_plan(plan, tmp_path / "plan.json")
    seen = spy_on(monkeypatch, command)
    out = tmp_path / "tuned"
    result = run("apply", tmp_path / "plan.json", "--model", tiny_checkpoint, "--out", out, "--finetune", "lora",
                 "--finetune-dataset", train_txt, "--finetune-samples", 16, "--finetune-seq-len", 16, *kd_flags(False))
    assert result.exit_code == 0, result.output
    check_distilled(seen, str(tiny_checkpoint), (1,), read_manifest(out)["history"][-1]["options"])
    assert f"lora distilled from {tiny_checkpoint}:" in result.stdout
    (log,) = out.glob("logs/*/training.log")
    assert f"distilling from {tiny_checkpoint}: KL at temperature 2 over the top 5 tokens" in log.read_text()
    # --teacher none: the next-token loss alone
    result = run("apply", tmp_path / "plan.json", "--model", tiny_checkpoint, "--out", out, "--overwrite",
                 "--finetune", "lora", "--finetune-dataset", train_txt, "--finetune-samples", 16,
                 "--finetune-seq-len", 16, "--teacher", "none")
    assert result.exit_code == 0, result.output
    assert seen["options"].distill is None and seen["teacher"] is None


def test_prune_finetune_distils_from_the_dense_model_in_memory(tmp_path, tokenizer, tiny_checkpoint, train_txt,
                                                               monkeypatch):
    import llamaprune.recover.finetune as trainer

    seen = spy_on(monkeypatch, trainer)
    out = tmp_path / "run"
    result = run("prune", "--base_model", tiny_checkpoint, "--dataset", train_txt, "--num_samples", 8, "--seq_len",
                 32, "--pruning_ratio", 0.1, "--finetune", "--finetune_samples", 24, "--finetune_seq_len", 32,
                 "--compensation_samples", 8, "--output_dir", out, *kd_flags(True))
    assert result.exit_code == 0, result.output
    check_distilled(seen, str(tiny_checkpoint), (0, 1), read_manifest(out)["history"][-1]["finetune"])
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert seen["teacher"].model.num_parameters() == dense.num_parameters()  # the dense model, not a pruned one
    bad = run("prune", "--base_model", tiny_checkpoint, "--dataset", train_txt, "--output_dir", tmp_path / "bad",
              "--finetune", "--kd_temperature", 0)
    assert_one_error_line(bad, "--kd_temperature must be positive")
