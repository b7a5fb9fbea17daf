"""Zero-shot accuracy through lm-eval (``--tasks``), offline: a small multiple-choice task defined here, run on a
tiny checkpoint and on a heterogeneous pruned one, against log-likelihoods computed in the test."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TEST_RAW, assert_one_error_line, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept, write_plan

TASK = "llamaprune_local_mc"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "made of cheese", "loud"], 0),
    ("Water freezes at", ["zero degrees", "a hundred degrees"], 0),
    ("The capital of France is", ["Berlin", "Paris", "Madrid"], 1),
    ("A cat has", ["two legs", "four legs", "six legs", "no legs at all"], 1),
    ("The opposite of hot is", ["cold", "warm"], 0),
    ("Bees make", ["milk", "honey", "silk"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
    ("One plus one equals", ["three", "two", "eleven", "one"], 1),
    ("Fish live in", ["water", "trees"], 0),
    ("Snow is usually", ["black", "white", "red"], 1),
    ("A week has", ["five days", "seven days", "ten days", "a hundred days"], 1),
    ("Ice is", ["frozen water", "hot air"], 0),
]


@pytest.fixture
def local_task(tmp_path):
    """(tasks dir, questions) of a 12-question multiple-choice task read from local JSONL (no hub)."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                            for q, c, label in QUESTIONS))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf-datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return tasks_dir


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("\n".join(TEST_RAW.read_text(encoding="utf-8").splitlines()[:60]), encoding="utf-8")
    return path


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of ``continuation`` after ``context``, tokenized as lm-eval's HFLM does
    (``_encode_pair``): trailing spaces of the context move to the continuation, and the continuation's tokens
    are those of encode(context + continuation) past len(encode(context))."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.size(1) - 1)
    return logprobs[positions, torch.tensor(continuation_ids)].sum().item()


def expected_accuracies(model, tokenizer, questions=QUESTIONS) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them: the argmax of the choices' log-likelihoods (continuation =
    target delimiter " " + choice), and of those divided by each choice's length in characters."""
    acc = acc_norm = 0
    for question, choices, label in questions:
        lls = torch.tensor([continuation_loglikelihood(model, tokenizer, question, " " + c) for c in choices])
        lengths = torch.tensor([float(len(c)) for c in choices])
        acc += int(lls.argmax()) == label
        acc_norm += int((lls / lengths).argmax()) == label
    return acc / len(questions), acc_norm / len(questions)


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_eval_tasks_match_an_independent_loglikelihood(tiny_checkpoint, local_task, text_file, tmp_path):
    from llamaprune.io.loading import load_model

    out = tmp_path / "eval.json"
    result = run("eval", tiny_checkpoint, "--dataset", text_file, "--seq-len", 16, "--max-windows", 2,
                 "--tasks-dir", local_task, "--tasks", TASK, "--batch-size", 3, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report[str(text_file)]["windows"] == 2  # perplexity is still there
    tasks = report["tasks"]
    assert (tasks["num_fewshot"], tasks["limit"]) == (0, None)
    assert tasks["lm_eval_version"] == __import__("lm_eval").__version__
    entry = tasks["results"][TASK]
    assert entry["samples"] == len(QUESTIONS)
    assert entry["acc_stderr"] > 0 and entry["acc_norm_stderr"] > 0
    loaded = load_model(str(tiny_checkpoint))
    acc, acc_norm = expected_accuracies(loaded.model, loaded.tokenizer)
    assert (entry["acc"], entry["acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert f"{TASK}: acc {acc:.3f}, acc_norm {acc_norm:.3f} (12 examples)" in result.stdout


def test_apply_eval_tasks_on_a_heterogeneous_pruned_checkpoint(tmp_path, tokenizer, local_task, text_file):
    from llamaprune.io.pruned_checkpoint import load_pruned

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2)
    source = tmp_path / "model"
    tiny_model(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    plan = plan_from_kept(config, [([1], [0, 4, 5, 20]), ([], [3, 7])])  # layer 1 skips attention
    write_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "pruned"
    result = run("apply", tmp_path / "plan.json", "--model", source, "--out", out, "--eval", text_file,
                 "--seq-len", 16, "--max-windows", 2, "--tasks-dir", local_task, "--tasks", TASK,
                 "--tasks-limit", 8)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "llamaprune"
    report = json.loads((out / "eval.json").read_text())
    assert report["options"]["tasks"] == {"tasks": [TASK], "limit": 8, "tasks_dir": str(local_task)}
    before, after = (report[key]["tasks"] for key in ("before", "after"))
    assert before["limit"] == after["limit"] == 8 and after["results"][TASK]["samples"] == 8
    assert f"{TASK}: acc {before['results'][TASK]['acc']:.3f} -> {after['results'][TASK]['acc']:.3f}" in result.stdout

    acc, acc_norm = expected_accuracies(load_pruned(out), tokenizer, QUESTIONS[:8])  # --tasks-limit 8: the first 8
    assert after["results"][TASK]["acc"] == pytest.approx(acc)
    assert after["results"][TASK]["acc_norm"] == pytest.approx(acc_norm)


def test_unknown_task_fails_before_the_weights_load(tiny_checkpoint, local_task, text_file, monkeypatch):
    import llamaprune.io.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the task names were checked")

    monkeypatch.setattr(llamaprune.io.loading, "load_model", no_loading)
    result = run("eval", tiny_checkpoint, "--dataset", text_file, "--tasks-dir", local_task,
                 "--tasks", f"{TASK},no_such_task")
    assert_one_error_line(result, "unknown task(s) no_such_task", str(local_task))


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--tasks", "piqa", "--tasks-limit", "0"], "--tasks-limit must be positive, got 0"),
        (["eval", "--tasks", " , "], "--tasks names no task"),
        (["eval", "--tasks-limit", "5"], "add --tasks NAMES"),
        (["eval", "--tasks", "piqa", "--tasks-dir", "no-such-dir"], "--tasks-dir not found: no-such-dir"),
        (["apply", "plan.json", "--model", "m", "--out", "o", "--tasks", "piqa"], "add --eval DATASET"),
    ],
)
def test_bad_task_options_are_one_line(args, message, tiny_checkpoint):
    if args[0] == "eval":
        args = ["eval", tiny_checkpoint, *args[1:]]
    assert_one_error_line(run(*args), message)


def test_without_lm_eval_tasks_name_the_install_command(tmp_path):
    """The extra missing (simulated): one line naming the install command, exit 2, before any model is looked at."""
    code = ("import sys\nsys.modules['lm_eval'] = None\nfrom llamaprune.cli.app import main\n"
            f"sys.argv = ['llamaprune', 'eval', {str(tmp_path / 'no-model')!r}, '--tasks', 'piqa']\nmain()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: --tasks needs lm-evaluation-harness, which is not installed; run pip install 'llamaprune[eval]'"
    ]


def test_prune_tasks_measure_the_dense_and_the_pruned_model(tiny_checkpoint, local_task, text_file, tmp_path):
    out = tmp_path / "run"
    common = ["prune", "--base_model", tiny_checkpoint, "--dataset", text_file, "--eval_dataset", text_file,
              "--num_samples", 4, "--seq_len", 16, "--eval_seq_len", 16, "--max_windows", 2, "--compensate", "none",
              "--output_dir", out, "--tasks", TASK, "--tasks_dir", local_task, "--tasks_limit", 5]
    assert_one_error_line(run(*common), "add --test_after_prune")
    result = run(*common, "--test_after_prune")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    before, after = (report[key]["tasks"]["results"][TASK] for key in ("before", "after"))
    assert before["samples"] == after["samples"] == 5
    assert f"{TASK}: acc {before['acc']:.3f} -> {after['acc']:.3f}, acc_norm" in result.stdout
