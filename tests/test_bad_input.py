"""Bad input a new user may give, each through the CLI: one ``error:`` line that names the file and the fix, exit
code 2, no traceback, nothing written. (A bug keeps its traceback: tests/test_cli_main.py.)"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
import typer
from conftest import TAYLOR, assert_one_error_line, calibration_text, write_run
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept, write_plan

LATIN1 = "caf\u00e9 au lait\n".encode("latin1")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def score_args(model, tmp_path, dataset=None):
    dataset = dataset or calibration_text(tmp_path)
    return ["score", model, "--out", tmp_path / "out", "--dataset", dataset, "--num-samples", 2, "--seq-len", 16,
            "--criteria", "magnitude"]


@pytest.fixture
def model(tmp_path, tiny_checkpoint):
    """A copy of the tiny checkpoint to spoil."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


def edit_config(model, **fields):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **fields}))


def truncate(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size])


class Evil:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# (spoil the checkpoint, fragments of the one error line)
CHECKPOINTS = {
    "truncated-safetensors": (lambda m: truncate(m / "model.safetensors", 4000),
                              ["model.safetensors is truncated", "download it again"]),
    "header-only": (lambda m: truncate(m / "model.safetensors", 100),
                    ["model.safetensors is truncated or not a safetensors file", "download it again"]),
    "garbage-safetensors": (lambda m: (m / "model.safetensors").write_bytes(os.urandom(5000)),
                            ["model.safetensors is truncated or not a safetensors file", "download it again"]),
    "garbage-index": (lambda m: (m / "model.safetensors.index.json").write_text("[1, 2]"),
                      ["model.safetensors.index.json is not a safetensors index", "download it again"]),
    "config-wider-than-weights": (lambda m: edit_config(m, intermediate_size=32),
                                  ["has shape [32, 24]", "config.json says [32, 32]", "download the checkpoint"]),
    "config-deeper-than-weights": (lambda m: edit_config(m, num_hidden_layers=3),
                                   ["config.json describes", "the weights lack (e.g. model.layers.2.",
                                    "download the checkpoint"]),
    "latin1-config": (lambda m: (m / "config.json").write_bytes(b'{"model_type": "llama", "x": "' + LATIN1 + b'"}'),
                      ["config.json is not UTF-8 text (byte 0xe9", "iconv"]),
    "no-tokenizer": (lambda m: [p.unlink() for p in m.glob("tokenizer*")],
                     ["has no tokenizer that transformers can load", "copy the tokenizer files"]),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_a_damaged_checkpoint_is_one_error_line_before_anything_loads(case, model, tmp_path, monkeypatch):
    spoil, fragments = CHECKPOINTS[case]
    spoil(model)
    monkeypatch.setattr("llamaprune.io.loading.load_model", lambda *a, **k: pytest.fail("checked before loading"))
    assert_one_error_line(invoke(*score_args(model, tmp_path)), str(model), *fragments)
    assert not (tmp_path / "out").exists()


def bin_checkpoint(model, payload) -> Path:
    """The checkpoint with its weights as a pickle (pytorch_model.bin) instead of safetensors."""
    (model / "model.safetensors").unlink()
    torch.save(payload, model / "pytorch_model.bin")
    return model


def test_a_malicious_pickle_is_refused_in_one_line_and_never_runs(model, tmp_path):
    marker = tmp_path / "pwned"
    bin_checkpoint(model, {"model.embed_tokens.weight": Evil(marker)})
    result = invoke(*score_args(model, tmp_path))
    assert_one_error_line(result, f"{model}: a .bin weight file holds Python objects", "trusted source")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_truncated_pickle_checkpoint_is_one_error_line(model, tmp_path):
    bin_checkpoint(model, {"model.embed_tokens.weight": torch.zeros(3)})
    truncate(model / "pytorch_model.bin", 200)
    assert_one_error_line(invoke(*score_args(model, tmp_path)), "is truncated or not a PyTorch checkpoint")


def latin1_jsonl(path):
    path.write_bytes(b'{"text": "' + LATIN1.strip() + b'"}\n')


def truncated_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"] * 50}), path)
    truncate(path, 60)


# (file name, writer, fragments) of a calibration text
DATASETS = {
    "latin1-txt": ("calib.txt", lambda p: p.write_bytes(LATIN1 * 20), ["is not UTF-8 text (byte 0xe9 at offset 3)"]),
    "latin1-raw": ("wiki.train.raw", lambda p: p.write_bytes(LATIN1 * 20), ["is not UTF-8 text (byte 0xe9"]),
    "latin1-jsonl": ("calib.jsonl", latin1_jsonl, ["is not UTF-8 text (byte 0xe9"]),
    "truncated-parquet": ("calib.parquet", truncated_parquet,
                          ["is truncated or not a Parquet file", "give a Parquet file with a 'text' column"]),
}


@pytest.mark.parametrize("case", DATASETS)
def test_a_dataset_that_cannot_be_read_is_one_line_naming_it(case, tiny_checkpoint, tmp_path):
    name, write, fragments = DATASETS[case]
    path = tmp_path / name
    write(path)
    assert_one_error_line(invoke(*score_args(tiny_checkpoint, tmp_path, path)), str(path), *fragments)


def test_a_latin1_finetuning_file_is_one_line_naming_it(tiny_checkpoint, tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(b'{"instruction": "' + LATIN1.strip() + b'", "output": "x"}\n')
    result = invoke("finetune", tiny_checkpoint, "--out", tmp_path / "out", "--dataset", path)
    assert_one_error_line(result, str(path), "is not UTF-8 text")


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR})


def test_a_latin1_plan_is_one_line_naming_it(tiny_checkpoint, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_bytes(b'{"kind": "llamaprune-plan", "name": "' + LATIN1.strip() + b'"}')
    result = invoke("apply", plan, "--model", tiny_checkpoint, "--out", tmp_path / "out")
    assert_one_error_line(result, str(plan), "is not UTF-8 text", "llamaprune plan")


@pytest.mark.parametrize("name", ["groups.parquet", "layers.parquet"])
def test_a_truncated_table_is_one_line_naming_it_and_the_command_that_rebuilds_it(run, name):
    truncate(run / name, 100)
    result = invoke("plan", run, "--ratio", 0.1)
    assert_one_error_line(result, str(run / name), "is truncated or not a Parquet file", "llamaprune score")
    assert not (run / "plans").exists()


def test_a_table_without_readable_metadata_is_one_line(run):
    import pyarrow.parquet as pq

    table = pq.read_table(run / "groups.parquet")
    pq.write_table(table.replace_schema_metadata({b"llamaprune": b"\xff{"}), run / "groups.parquet")
    assert_one_error_line(invoke("sql", run, "SELECT 1 FROM groups"), "has no llamaprune metadata")


def test_a_latin1_manifest_is_one_line_naming_it(run):
    (run / "manifest.json").write_bytes(b'{"schema_version": 1, "x": "' + LATIN1.strip() + b'"}')
    assert_one_error_line(invoke("plan", run, "--ratio", 0.1), str(run / "manifest.json"), "is not UTF-8 text")


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit: json.loads raises RecursionError


def deep_table_metadata(path):
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).replace_schema_metadata({b"llamaprune": DEEP.encode()}), path)


# (command, the file it reads, how to spoil it, fragments of the one error line): every JSON document a user
# gives, nested too deeply
DEEP_JSON = {
    "apply-plan": (lambda run, model, tmp: ["apply", tmp / "plan.json", "--model", model, "--out", tmp / "out"],
                   lambda run, model, tmp: tmp / "plan.json", ["make the plan again"]),
    "sql-plan": (lambda run, model, tmp: ["sql", run, "SELECT count(*) FROM plans"],
                 lambda run, model, tmp: run / "plans" / "deep.json", ["make the plan again"]),
    "manifest": (lambda run, model, tmp: ["plan", run, "--ratio", 0.1],
                 lambda run, model, tmp: run / "manifest.json", ["llamaprune score"]),
    "config": (lambda run, model, tmp: score_args(model, tmp),
               lambda run, model, tmp: model / "config.json", ["give a Hugging Face checkpoint directory"]),
    "safetensors-index": (lambda run, model, tmp: score_args(model, tmp),
                          lambda run, model, tmp: model / "model.safetensors.index.json", ["download it again"]),
    "finetune-jsonl": (lambda run, model, tmp: ["finetune", model, "--out", tmp / "out", "--dataset",
                                                tmp / "alpaca.jsonl"],
                       lambda run, model, tmp: tmp / "alpaca.jsonl", []),
    "calibration-jsonl": (lambda run, model, tmp: score_args(model, tmp, tmp / "calib.jsonl"),
                          lambda run, model, tmp: tmp / "calib.jsonl", []),
}


@pytest.mark.parametrize("case", DEEP_JSON)
def test_deeply_nested_json_is_one_line_naming_the_file_not_a_recursion_error(case, run, model, tmp_path):
    args, where, fragments = DEEP_JSON[case]
    path = where(run, model, tmp_path)
    path.parent.mkdir(exist_ok=True)
    path.write_text(DEEP + "\n")
    result = invoke(*args(run, model, tmp_path))
    where = f"{path}:1" if path.suffix == ".jsonl" else str(path)
    assert_one_error_line(result, f"{where} is JSON nested too deeply to read", *fragments)
    assert not (tmp_path / "out").exists()


def test_table_metadata_nested_too_deeply_is_one_line(run):
    deep_table_metadata(run / "groups.parquet")
    assert_one_error_line(invoke("sql", run, "SELECT 1 FROM groups"), "has no llamaprune metadata")


def test_apply_names_the_calibration_flag_as_typed(tmp_path):
    result = invoke("apply", tmp_path / "plan.json", "--model", tmp_path / "model", "--out", tmp_path / "out",
                    "--compensate", "lstsq", "--calibration-samples", 0)
    assert_one_error_line(result, "--calibration-samples must be positive, got 0")


def option_arguments(tmp_path) -> dict[str, list]:
    """Per command, arguments under which every option is checked (--eval, --tasks, --finetune, lstsq), all of
    whose inputs are missing: nothing loads, and an option checked before that fails changes the error."""
    gone = tmp_path / "missing"
    return {
        "eval": [gone / "model", "--dataset", gone / "test.txt", "--tasks", "piqa"],
        "score": [gone / "model", "--out", tmp_path / "out", "--dataset", gone / "calib.txt"],
        "plan": [gone / "run", "--ratio", 0.2],
        "sql": [gone / "run", "SELECT 1"],
        "apply": [gone / "plan.json", "--model", gone / "model", "--out", tmp_path / "out", "--eval", gone / "t.txt",
                  "--tasks", "piqa", "--finetune", "lora", "--finetune-dataset", gone / "train.txt",
                  "--compensate", "lstsq", "--calibration", gone / "calib.txt"],
        "export": [gone / "model", "--out", tmp_path / "out.gguf"],
        "finetune": [gone / "model", "--out", tmp_path / "out", "--dataset", gone / "train.txt", "--eval",
                     gone / "test.txt"],
        "prune": ["--base_model", gone / "model", "--dataset", gone / "calib.txt", "--eval_dataset", gone / "t.txt",
                  "--test_after_prune", "--finetune", "--tasks", "piqa", "--output_dir", tmp_path / "run"],
    }


# Options whose value names an input, an output or lm-eval tasks: a bad one is reported by what it names.
NAMES_SOMETHING = {"dataset", "eval_dataset", "finetune_dataset", "calibration", "base_model", "data_dir", "tasks",
                   "tasks_dir", "output_dir", "name", "save_ckpt_log_name", "lora_targets", "teacher"}
BAD_VALUES = {int: ["0", "-1", "1"], float: ["0", "-1", "1", "1.5", "nan"], str: ["bogus"]}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def option_kinds(command: str) -> dict[str, type]:
    """The int, float and str options of ``command`` (by parameter name), from its function's annotations."""
    info = next(c for c in app.registered_commands if c.name == command)
    kinds = {}
    for name, hint in typing.get_type_hints(inspect.unwrap(info.callback)).items():
        kinds[name] = next((kind for kind in (float, int, str) if kind in {hint, *typing.get_args(hint)}), None)
    return kinds


def test_an_option_value_refused_names_the_flag_as_typed(tmp_path):
    """Every command, every number and choice option, a few bad values each: an error the value causes names
    that option as the command spells it (not a field, nor another command's or phase's flag: apply's
    --finetune-seq-len, prune's --eval_seq_len), and any other flag it names is one of the command's."""
    commands, wrong = typer.main.get_command(app).commands, []
    for command, args in option_arguments(tmp_path).items():
        params = commands[command].params
        flags = {o for p in params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        kinds = option_kinds(command)
        baseline = invoke(command, *args)
        assert baseline.exit_code == 2, (command, baseline.output)
        for param in params:
            if param.param_type_name != "option" or param.name in NAMES_SOMETHING or not kinds.get(param.name):
                continue
            for value in BAD_VALUES[kinds[param.name]]:
                result = invoke(command, *args, param.opts[0], value)
                assert result.exit_code == 2, (command, param.opts[0], value, result.output)
                if result.stderr == baseline.stderr:
                    continue  # a good value, or one checked later than the missing input
                line = result.stderr.strip().splitlines()[-1]
                named = FLAG.findall(re.sub(r"`[^`]*`", "", line))  # `llamaprune other-command ...` aside
                if not set(named) & {*param.opts, *param.secondary_opts} or not set(named) <= flags:
                    wrong.append(f"{command} {param.opts[0]} {value}: {line}")
    assert not wrong, "\n".join(wrong)


def test_out_under_a_file_is_one_line_naming_the_file(tiny_checkpoint, tmp_path):
    (tmp_path / "afile").write_text("x")
    args = score_args(tiny_checkpoint, tmp_path)
    args[3] = tmp_path / "afile" / "run"
    assert_one_error_line(invoke(*args), f"lies under {tmp_path / 'afile'}, which is a file")


def test_a_seq_len_beyond_the_context_warns(tiny_checkpoint, tmp_path, caplog):
    args = score_args(tiny_checkpoint, tmp_path)
    args[args.index("--seq-len") + 1] = 300  # the tiny models' max_position_embeddings is 256
    with caplog.at_level(logging.WARNING, logger="llamaprune"):
        result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "--seq-len 300 is longer than the model's context (max_position_embeddings 256)" in caplog.text


def test_apply_without_a_source_tokenizer_warns_in_a_full_sentence(tiny_checkpoint, tmp_path, caplog):
    from transformers import AutoConfig

    [p.unlink() for p in tiny_checkpoint.glob("tokenizer*")]
    plan = plan_from_kept(AutoConfig.from_pretrained(tiny_checkpoint), [([0], [1, 2])] * 2)
    write_plan(plan, tmp_path / "plan.json")
    with caplog.at_level(logging.WARNING, logger="llamaprune"):
        result = invoke("apply", tmp_path / "plan.json", "--model", tiny_checkpoint, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (line,) = [r.getMessage() for r in caplog.records if "no tokenizer written" in r.getMessage()]
    assert str(tiny_checkpoint) in line and "copy the tokenizer files" in line and "\n" not in line
