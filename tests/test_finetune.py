"""Recovery finetuning: loss goes down, LoRA merges exactly, the best weights are kept, the output
checkpoint (uniform llama or heterogeneous llamaprune) loads with from_pretrained, the instruction mask covers
exactly the prompt, PPLMetric keeps the seed's keys, and bad input is one error line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, VALID_TXT, assert_one_error_line, tiny_config, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llamaprune.apply.command import apply_plan
from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept
from llamaprune.evaluate.perplexity import PPLMetric, perplexity
from llamaprune.io.pruned_checkpoint import MODELING_FILE, save_pruned
from llamaprune.io.text_data import evaluation_windows, load_rows
from llamaprune.recover.data import build_examples, collate, read_source, split_validation
from llamaprune.recover.finetune import (
    FinetuneOptions,
    finetune,
    lr_factor,
    merge_lora,
    optimizer_step,
    prepare,
    token_nll,
)

LORA = dict(method="lora", lr=3e-2, lora_r=4, lora_alpha=8)
FULL = dict(method="full", lr=1e-2)
PROMPT_NO_INPUT = (  # the Alpaca template, written out here independently of llamaprune
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@pytest.fixture
def train_txt(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(VALID_TXT.read_text(encoding="utf-8").splitlines()[:300]), encoding="utf-8")
    return path


@pytest.fixture
def eval_txt(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(VALID_TXT.read_text(encoding="utf-8").splitlines()[300:360]), encoding="utf-8")
    return path


def options(train_txt, **kwargs) -> FinetuneOptions:
    return FinetuneOptions(
        **{"dataset": str(train_txt), "samples": 48, "seq_len": 32, "val_every": 2, **kwargs}
    )


def model_for(tokenizer, layers: int = 2, seed: int = 0):
    return tiny_model(tiny_config(vocab=len(tokenizer), layers=layers), seed)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def validation_of(tokenizer, opts: FinetuneOptions) -> dict:
    """The validation batch ``finetune`` holds out, rebuilt from the same seeded calls."""
    examples = build_examples(tokenizer, read_source(opts.dataset), opts.samples, opts.seq_len, opts.seed)
    _, held_out = split_validation(examples, opts.val_fraction, opts.batch_size, opts.seed)
    return collate(held_out, tokenizer.eos_token_id)


def mean_nll(model, batch) -> float:
    """Mean next-token NLL written directly with torch (labels -100 skipped)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    log_probs = torch.log_softmax(out[:, :-1].double(), dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked[keep]).mean())


@pytest.mark.parametrize("method", [LORA, FULL], ids=["lora", "full"])
def test_loss_goes_down_and_the_best_weights_come_back(tokenizer, train_txt, method):
    opts = options(train_txt, epochs=3, **method)
    result = finetune(model_for(tokenizer), tokenizer, opts, progress=False)
    validation = [point["loss"] for point in result.curve["validation"]]
    assert validation[0] == pytest.approx(
        math.log(len(tokenizer)), abs=0.1
    )  # a random model starts near uniform
    assert result.best["loss"] == min(validation) < validation[0] - 0.05
    train = [point["loss"] for point in result.curve["train"]]
    assert sum(train[-3:]) < sum(train[:3])
    assert result.steps == 3 * math.ceil(40 / 8) and result.train_examples + result.validation_examples == 48
    assert mean_nll(merge_lora(result.model), validation_of(tokenizer, opts)) == pytest.approx(
        result.best["loss"], abs=1e-5
    )


def test_a_diverging_run_returns_the_initial_weights(tokenizer, train_txt):
    original = model_for(tokenizer)
    result = finetune(
        model_for(tokenizer), tokenizer, options(train_txt, method="full", lr=3.0), progress=False
    )
    assert result.best["step"] == 0 and result.curve["validation"][-1]["loss"] > result.best["loss"]
    trained = dict(result.model.named_parameters())
    assert all(torch.equal(p, trained[name]) for name, p in original.named_parameters())


def test_merged_lora_equals_the_adapter_model(tokenizer, train_txt):
    original = model_for(tokenizer, seed=1)
    result = finetune(model_for(tokenizer, seed=1), tokenizer, options(train_txt, **LORA), progress=False)
    ids = torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    expected = logits(result.model, ids)
    merged = merge_lora(result.model)
    assert type(merged) is type(original) and not any(p.requires_grad for p in merged.parameters())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(original, ids), expected, atol=1e-3)  # the adapter did change the model


def heterogeneous_model(tokenizer):
    """A pruned tiny model: layer 0 narrower, layer 1 without attention, layer 2 without MLP."""
    config = tiny_config(vocab=len(tokenizer), layers=3)
    plan = plan_from_kept(config, [([0], [1, 5, 7, 9]), ([], list(range(12))), ([1], [])])
    return apply_plan(tiny_model(config), plan), plan


def test_gradient_checkpointing_gives_the_same_lora_gradients(tokenizer, train_txt):
    batch = validation_of(tokenizer, options(train_txt))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = prepare(
            heterogeneous_model(tokenizer)[0], options(train_txt, gradient_checkpointing=checkpointing)
        )
        model.train()
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        token_nll(out, batch["labels"])[0].backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_gradient_accumulation_equals_one_big_batch(tokenizer, train_txt):
    batch = validation_of(tokenizer, options(train_txt))  # 8 windows
    halves = [{key: value[i : i + 4] for key, value in batch.items()} for i in (0, 4)]
    weights = []
    for group in ([batch], halves):
        model = model_for(tokenizer)
        params = list(model.parameters())
        loss, nll = optimizer_step(model, group, params, torch.optim.SGD(params, lr=0.1), torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in params]))
    assert loss == nll == pytest.approx(mean_nll(model_for(tokenizer), batch), abs=1e-5)
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and not torch.equal(
        weights[0], torch.cat([p.flatten() for p in model_for(tokenizer).parameters()])
    )


def test_token_nll_and_schedule_closed_forms():
    logits_ = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    nll, count = token_nll(logits_, torch.tensor([[-100, 1, -100]]))
    assert count == 1 and nll.item() == pytest.approx(-math.log(0.5))
    nll, count = token_nll(logits_, torch.tensor([[0, 1, 0]]))
    assert count == 2 and nll.item() == pytest.approx(-math.log(0.5) - math.log(0.25))
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)


def test_instruction_labels_mask_exactly_the_prompt(tmp_path, tokenizer):
    records = [
        {"instruction": "Name the river.", "input": "It flows through Paris.", "output": "The Seine."},
        {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    source = read_source(str(path))
    assert source.kind == "instruction"
    examples = build_examples(tokenizer, source, samples=10, seq_len=256, seed=0)
    assert len(examples) == 2
    for ids, labels in examples:
        record = next(r for r in records if tokenizer.decode(ids).endswith(r["output"] + "</s>"))
        template = PROMPT_WITH_INPUT if record["input"] else PROMPT_NO_INPUT
        prompt = tokenizer(template.format(**record), add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == -100).all() and torch.equal(
            labels[len(prompt) :], ids[len(prompt) :]
        )
        assert ids[-1].item() == tokenizer.eos_token_id and len(ids) > len(prompt) + 1
    batch = collate(examples, pad_token_id=0)
    short = int(batch["attention_mask"].sum(1).min())
    row = int(batch["attention_mask"].sum(1).argmin())
    assert (batch["labels"][row, short:] == -100).all() and (batch["attention_mask"][row, short:] == 0).all()
    # a prompt that fills seq_len leaves nothing to learn: the example is dropped
    assert build_examples(tokenizer, source, samples=10, seq_len=8, seed=0) == []


def test_a_text_jsonl_is_plain_text(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "plain words"}) + "\n", encoding="utf-8")
    source = read_source(str(path))
    assert source.kind == "text" and source.rows == ["plain words"]


def test_pplmetric_keeps_the_seed_keys_and_equals_perplexity(tokenizer, eval_txt):
    model = model_for(tokenizer)
    result = PPLMetric(
        model,
        tokenizer,
        ["wikitext2", str(eval_txt)],
        seq_len=32,
        max_windows=4,
        data_dir=str(SHARED_DATA),
        device="cpu",
    )
    assert list(result) == ["wikitext2 (wikitext-2-raw-v1)", str(eval_txt)]
    rows = load_rows("wikitext2", split="test", data_dir=str(SHARED_DATA))
    expected = perplexity(model, evaluation_windows(tokenizer, rows, 32, 4), progress=False).ppl
    assert result["wikitext2 (wikitext-2-raw-v1)"] == pytest.approx(expected, rel=1e-9)


def run(*args):
    return CliRunner().invoke(app, ["finetune", *map(str, args)])


def saved_heterogeneous(path, tokenizer):
    """A heterogeneous pruned checkpoint directory, with the files apply leaves beside the weights."""
    model, plan = heterogeneous_model(tokenizer)
    save_pruned(model, path)
    tokenizer.save_pretrained(path)
    (path / "plan.json").write_text(json.dumps(plan.to_dict()))
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "history": [{"command": "apply"}]}))
    return path


@pytest.mark.parametrize(
    ("kind", "method"),
    [("uniform", "lora"), ("heterogeneous", "lora"), ("heterogeneous", "full")],
)
def test_finetune_cli_writes_a_checkpoint_that_from_pretrained_loads(
    kind, method, tmp_path, tokenizer, tiny_checkpoint, train_txt, eval_txt
):
    source = tiny_checkpoint if kind == "uniform" else saved_heterogeneous(tmp_path / "pruned", tokenizer)
    out = tmp_path / "out"
    extra = ["--save-adapter", "--lora-r", 4, "--lr", 3e-2] if method == "lora" else ["--lr", 1e-2]
    result = run(
        source,
        "--out",
        out,
        "--method",
        method,
        "--dataset",
        train_txt,
        "--samples",
        32,
        "--seq-len",
        32,
        "--eval",
        eval_txt,
        "--eval-seq-len",
        32,
        "--max-windows",
        4,
        *extra,
    )
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.stdout and "perplexity" in result.stdout

    config = json.loads((out / "config.json").read_text())
    ours = kind == "heterogeneous"
    assert config["model_type"] == ("llamaprune" if ours else "llama")
    assert (out / MODELING_FILE.name).is_file() == ours and ("auto_map" in config) == ours
    assert (out / "tokenizer.json").is_file() and (out / "loss_curve.png").stat().st_size > 0
    assert list((out / "logs").glob("*/training.log"))
    assert (out / "adapter" / "adapter_config.json").is_file() == (method == "lora")
    curve = json.loads((out / "loss_curve.json").read_text())
    assert curve["best"]["loss"] == min(p["loss"] for p in curve["validation"])
    history = json.loads((out / "manifest.json").read_text())["history"]
    assert history[-1]["command"] == "finetune" and history[-1]["options"]["method"] == method
    if ours:
        assert (out / "plan.json").read_text() == (source / "plan.json").read_text()
        assert history[0]["command"] == "apply"

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    windows = evaluation_windows(tokenizer, eval_txt.read_text(encoding="utf-8").splitlines(), 32, 4)
    report = json.loads((out / "eval.json").read_text())
    assert perplexity(loaded, windows, progress=False).ppl == pytest.approx(report["after"]["ppl"], rel=1e-5)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    assert perplexity(original, windows, progress=False).ppl == pytest.approx(
        report["before"]["ppl"], rel=1e-5
    )
    assert report["after"]["ppl"] != report["before"]["ppl"]


def test_finetune_eval_warms_up_like_apply_and_reports_the_params_ratio(
    tmp_path, tiny_checkpoint, train_txt, eval_txt, monkeypatch
):
    """Each measurement starts with one warm-up batch, so one-off costs do not skew tokens/s."""
    from llamaprune.evaluate import perplexity as evaluate

    calls = []

    def counted(model, windows, batch_size=8, progress=True):
        calls.append(windows.shape[0])
        return perplexity(model, windows, batch_size, progress)

    monkeypatch.setattr(evaluate, "perplexity", counted)
    result = run(tiny_checkpoint, "--out", tmp_path / "out", "--dataset", train_txt, "--samples", 16,
                 "--seq-len", 16, "--eval", eval_txt, "--eval-seq-len", 16, "--max-windows", 6, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert calls == [4, 6, 4, 6]  # before and after: a warm-up batch, then every window
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["before"]["num_parameters"] == report["after"]["num_parameters"] > 0
    assert report["params_ratio"] == 1.0
    assert "tokens_per_s_ratio" not in report  # the model before finetuning is gone: no speeds timed in turn


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--method", "qlora"], "--method 'qlora' is not one of: lora, full"),
        (["--lora-r", 0], "--lora-r must be positive"),
        (["--lr", -1e-4], "--lr must be positive"),
        (["--method", "full", "--save-adapter"], "--save-adapter"),
        (["--dataset", "nowhere.txt"], "dataset file not found: nowhere.txt"),
    ],
)
def test_bad_input_is_one_error_line(args, fragment, tiny_checkpoint, tmp_path):
    result = run(tiny_checkpoint, "--out", tmp_path / "out", *args)
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_missing_model_dir_is_one_error_line(tmp_path, train_txt):
    assert_one_error_line(
        run(tmp_path / "missing", "--out", tmp_path / "out", "--dataset", train_txt), "model not found"
    )


def test_unknown_lora_targets_fail_after_loading_without_leaving_output(tmp_path, tiny_checkpoint, train_txt):
    result = run(
        tiny_checkpoint, "--out", tmp_path / "out", "--dataset", train_txt, "--lora-targets", "q_proj,wq"
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: --lora-targets wq match no linear layer")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_jsonl_that_is_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1 is not valid JSON"):
        read_source(str(path))
