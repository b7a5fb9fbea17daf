"""Scoring across processes (torchrun, gloo on CPU): data-parallel and FSDP-sharded runs give the table of one
process on the same windows, a killed process ends the others with one line and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import VALID_TXT, tiny_config, tiny_model
from safetensors.torch import load_file

from llamaprune.core.criteria import CRITERIA
from llamaprune.core.errors import UsageError
from llamaprune.scoring.sharded import check_fsdp_torch

ROOT = Path(__file__).resolve().parents[1]
# every criterion, obs included (its Gram matrices and output gradients add up over processes like the rest)
SCORE = ["score", "--dataset", str(VALID_TXT), "--num-samples", "16", "--seq-len", "24", "--batch-size", "4",
         "--criteria", ",".join(CRITERIA)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def llamaprune(*args, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m llamaprune ARGS``, under ``torchrun --nproc-per-node NPROC`` when NPROC > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "llamaprune", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny GQA llama with biases everywhere (so sharded biases are scored too), in several shards."""
    path = tmp_path_factory.mktemp("dist") / "tiny"
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, intermediate=40, bias=True)
    tiny_model(config).save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single(checkpoint):
    out = checkpoint.parent / "single"
    done = llamaprune(*SCORE, checkpoint, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(a: Path, b: Path, rtol: float = 1e-6) -> None:
    """Every score, layer figure and statistic equal to ``rtol`` relative, and the same 20% plan."""
    ga, gb = (pq.read_table(run / "groups.parquet").to_pandas() for run in (a, b))
    assert list(ga.columns) == list(gb.columns)
    for criterion in (c for c in CRITERIA if c in ga):
        np.testing.assert_allclose(gb[criterion], ga[criterion], rtol=rtol, atol=0, err_msg=criterion)
    la, lb = (pq.read_table(run / "layers.parquet").to_pandas() for run in (a, b))
    np.testing.assert_allclose(lb["block_influence"], la["block_influence"], rtol=rtol, atol=1e-12)
    sa, sb = load_file(a / "stats.safetensors"), load_file(b / "stats.safetensors")
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_allclose(sb[key].double().numpy(), sa[key].double().numpy(), rtol=rtol, atol=1e-12,
                                   err_msg=key)
    plans = []
    for run in (a, b):
        done = llamaprune("plan", run, "--ratio", "0.2", "--name", "p", "--overwrite")
        assert done.returncode == 0, done.stderr
        plans.append(json.loads((run / "plans" / "p.json").read_text())["layers"])
    assert plans[0] == plans[1]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["data-parallel", "fsdp"])
def test_two_processes_score_like_one(checkpoint, single, mode):
    out = checkpoint.parent / f"two{'-'.join(mode)}"
    done = llamaprune(*SCORE, checkpoint, "--out", out, *mode, nproc=2)
    if mode and not fsdp_supported():  # refused in one line by each process, nothing written
        assert done.returncode != 0 and "--fsdp needs torch" in done.stdout + done.stderr
        assert not out.exists()
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("scored ") == 1  # the first process reports, and writes
    assert_same_run(single, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == {"count": 2, "fsdp": bool(mode)}
    if mode:  # each process holds half of every w*G sum; obs's float64 Gram matrices are whole in each
        config = json.loads((checkpoint / "config.json").read_text())
        grams = config["num_hidden_layers"] * 8 * sum((n + 1) ** 2 for n in (config["hidden_size"],
                                                                               config["intermediate_size"]))
        whole = json.loads((single / "manifest.json").read_text())["accumulators"]["bytes"] - grams
        assert manifest["accumulators"]["bytes"] - grams < 0.75 * whole


@pytest.fixture(scope="module", params=["qwen3", "gemma3_text"])
def family_single(request, tmp_path_factory, tokenizer):
    """A tiny Qwen3 / Gemma 3 checkpoint (query/key norms; Gemma's post-norms, sliding layers, scaled and tied
    embeddings) and its one-process run."""
    path = tmp_path_factory.mktemp(request.param) / "tiny"
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=3, intermediate=40,
                         model_type=request.param, tie=request.param == "gemma3_text")
    tiny_model(config).save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    done = llamaprune(*SCORE, path, "--out", path.parent / "single")
    assert done.returncode == 0, done.stderr
    return path, path.parent / "single"


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["data-parallel", "fsdp"])
def test_two_processes_score_qwen3_and_gemma3_like_one(family_single, mode):
    if mode and not fsdp_supported():
        pytest.skip("this torch's FSDP is refused (test_two_processes_score_like_one checks how)")
    checkpoint, single = family_single
    out = checkpoint.parent / f"two{'-'.join(mode)}"
    done = llamaprune(*SCORE, checkpoint, "--out", out, *mode, nproc=2)
    assert done.returncode == 0, done.stderr
    assert_same_run(single, out)


def fsdp_supported() -> bool:
    try:
        check_fsdp_torch()
    except UsageError:
        return False
    return True


@pytest.mark.parametrize(("version", "refused"), [("2.6.0", True), ("2.8.0+cu128", True), ("2.13.0+cpu", False),
                                                  ("2.14.1", False), ("3.0.0", False)])
def test_fsdp_names_the_torch_it_needs(version, refused):
    if refused:
        said = f"--fsdp needs torch 2.13 or newer, and this is torch {version}"
        with pytest.raises(UsageError, match=re.escape(said)):
            check_fsdp_torch(version)
    else:
        check_fsdp_torch(version)


def test_bf16_accumulators_take_half_the_memory(checkpoint, single):
    out = checkpoint.parent / "bf16"
    done = llamaprune(*SCORE, checkpoint, "--out", out, "--accumulate", "bf16", "--criteria", "taylor")
    assert done.returncode == 0, done.stderr
    fp32 = json.loads((single / "manifest.json").read_text())["accumulators"]
    bf16 = json.loads((out / "manifest.json").read_text())["accumulators"]
    assert fp32["dtype"] == "fp32" and bf16["dtype"] == "bf16"
    assert bf16["bytes"] < 0.6 * fp32["bytes"]  # the w*G sums halve; the per-feature statistics stay
    a, b = (pq.read_table(run / "groups.parquet").column("taylor").to_numpy() for run in (single, out))
    np.testing.assert_allclose(b, a, rtol=0.05)


def test_fsdp_needs_torchrun(checkpoint, tmp_path):
    done = llamaprune(*SCORE, checkpoint, "--out", tmp_path / "run", "--fsdp")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --fsdp"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_process_ends_the_others_with_one_line_and_no_run(checkpoint, tmp_path):
    """The two processes are started as torchrun would, so that nothing but the dead partner stops the survivor."""
    out, port = tmp_path / "run", free_port()
    args = [*SCORE, checkpoint, "--out", out, "--num-samples", "512"]
    procs = []
    for rank in range(2):
        rank_env = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "llamaprune", *map(str, args)], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".run.tmp-") for p in tmp_path.iterdir()):  # process 0 is writing
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # into the scoring
    procs[1].send_signal(signal.SIGKILL)
    _, stderr = procs[0].communicate(timeout=300)
    procs[1].wait()
    lines = stderr.strip().splitlines()
    assert procs[0].returncode == 2, stderr
    assert lines[-1].startswith("error: process 0 of 2: another process of this run stopped"), stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, no temporary


@pytest.mark.real
def test_smollm2_two_processes_score_like_one(tmp_path):
    base = ["score", "smollm2-135m", "--dataset", str(VALID_TXT), "--num-samples", "16", "--seq-len", "64"]
    for name, nproc in (("one", 1), ("two", 2)):
        done = llamaprune(*base, "--out", tmp_path / name, nproc=nproc, timeout=1200)
        assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
