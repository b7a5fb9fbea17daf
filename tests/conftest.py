"""Shared fixtures: tiny random GQA models, a small trained tokenizer, the real text and model."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from llamaprune.apply.command import apply_plan
from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.plan_file import Plan, plan_from_kept
from llamaprune.core.tables import groups_schema, layers_schema, with_meta, write_table
from llamaprune.io.weights import safetensors_files

# Hypothesis keeps an example cache; tests write nowhere but temporary directories.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="llamaprune-hypothesis-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VALID_TXT = SHARED_DATA / "wikitext-2-tokens" / "valid.txt"
TEST_RAW = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def tiny_config(
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    layers: int = 2,
    intermediate: int = 24,
    vocab: int = 64,
    bias: bool = False,
    tie: bool = False,
    model_type: str = "llama",
    rope: dict | None = None,
):
    """A small random config; ``model_type`` llama, mistral, qwen2 (q/k/v biases), qwen3 or gemma3_text; ``rope``
    its ``rope_parameters`` (transformers' default rope when None). Qwen3 and Gemma 3 get a hidden size that is not
    ``heads * head_dim``; Gemma 3 also sliding layers (a window of 5, shorter than the test sequences) between
    full ones, and an attention scale that is not head_dim's."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=heads * (head_dim + 2) if model_type in FAMILIES_BEYOND_HEADS else heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    if rope is not None:
        common["rope_parameters"] = rope
    if model_type == "llama":
        return LlamaConfig(attention_bias=bias, mlp_bias=bias, **common)
    if model_type == "mistral":
        return MistralConfig(**common)
    if model_type == "qwen3":
        return Qwen3Config(**common)
    if model_type == "gemma3_text":
        types = ["sliding_attention" if i % 3 != 2 else "full_attention" for i in range(layers)]
        return Gemma3TextConfig(**common, layer_types=types, sliding_window=5, query_pre_attn_scalar=head_dim + 2)
    return Qwen2Config(**common)


# Families whose attention width (heads x head_dim) the tiny configs make differ from the hidden size.
FAMILIES_BEYOND_HEADS = ("qwen3", "gemma3_text")
FAMILIES = ("llama", "mistral", "qwen2", *FAMILIES_BEYOND_HEADS)


def tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases and norms, so no group is trivially zero
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on the validation text (vocab 320), no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = VALID_TXT.read_text(encoding="utf-8").splitlines()[:3000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    """A saved tiny GQA llama checkpoint directory (vocab matching the tokenizer)."""
    model = tiny_model(tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def gpt2_checkpoint(tmp_path):
    """A config-only GPT-2 checkpoint directory: an architecture llamaprune does not support."""
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M, in float32 on CPU (fetched into the cache on first use)."""
    from llamaprune.io.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLAMAPRUNE_DATA_DIR", raising=False)


def group_slices(model, layer: int, kind: str, index: int):
    """(parameter, index) pairs covering one group, written from docs/ARTIFACTS.md ("Groups"), not from llamaprune."""
    cfg = model.config
    block = model.model.layers[layer]
    d = cfg.head_dim
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    out = []
    if kind == "attn":
        for proj, lo, hi in (
            (block.self_attn.q_proj, index * r * d, (index + 1) * r * d),
            (block.self_attn.k_proj, index * d, (index + 1) * d),
            (block.self_attn.v_proj, index * d, (index + 1) * d),
        ):
            out.append((proj.weight, (slice(lo, hi),)))
            if proj.bias is not None:
                out.append((proj.bias, (slice(lo, hi),)))
        out.append((block.self_attn.o_proj.weight, (slice(None), slice(index * r * d, (index + 1) * r * d))))
    else:
        for proj in (block.mlp.gate_proj, block.mlp.up_proj):
            out.append((proj.weight, (slice(index, index + 1),)))
            if proj.bias is not None:
                out.append((proj.bias, (slice(index, index + 1),)))
        out.append((block.mlp.down_proj.weight, (slice(None), slice(index, index + 1))))
    return out


# ---------------------------------------------------------------- pruned models against zeroed originals

TOL = 1e-5


def random_plan(config, seed: int, skip_p: float = 0.2, remove_p: float = 0.2) -> Plan:
    """Random kept subsets per layer; some blocks skipped, some layers removed (never all of them)."""
    rng = random.Random(seed)
    n = config.num_hidden_layers

    def subset(size: int) -> list[int]:
        if rng.random() < skip_p:
            return []
        return sorted(rng.sample(range(size), rng.randint(1, max(1, size - 1))))

    kept = [(subset(config.num_key_value_heads), subset(config.intermediate_size)) for _ in range(n)]
    removed = {i for i in range(n) if rng.random() < remove_p}
    if len(removed) == n:
        removed.discard(0)
    return plan_from_kept(config, kept, removed)


@contextmanager
def zeroed_reference(model, plan: Plan):
    """``model`` with the plan's pruned groups zeroed (in place) and skips/removals done by forward hooks."""
    handles = []
    with torch.no_grad():
        for lp in plan.layers:
            block = model.model.layers[lp.layer]
            for g in set(range(lp.num_key_value_heads)) - set(lp.attn_groups):
                for param, index in group_slices(model, lp.layer, "attn", g):
                    param[index] = 0
            for c in set(range(lp.intermediate_size)) - set(lp.mlp_channels):
                for param, index in group_slices(model, lp.layer, "mlp", c):
                    param[index] = 0
            if lp.removed:
                handles.append(block.register_forward_hook(lambda mod, args, out: args[0]))
                continue
            if "attention" in lp.skip:
                handles.append(block.self_attn.register_forward_hook(lambda mod, args, out: (out[0] * 0, out[1])))
            if "mlp" in lp.skip:
                handles.append(block.mlp.register_forward_hook(lambda mod, args, out: out * 0))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def pruned_and_reference(config, plan: Plan, seed: int = 0):
    """(pruned model, its zeroed reference): two copies of the same random model."""
    return apply_plan(tiny_model(config, seed), plan), tiny_model(config, seed)


def ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def read_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


# ---------------------------------------------------------------- a checkpoint loaded where llamaprune is not

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    class NoLlamaprune:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "llamaprune":
                raise ImportError("llamaprune is not installed here")

    sys.meta_path.insert(0, NoLlamaprune())
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    path, inputs_file, out_file = sys.argv[1:]
    try:
        import llamaprune
        raise SystemExit("llamaprune must not be importable in this test")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    inputs = torch.load(inputs_file)
    x, mask = inputs["ids"], inputs["mask"]
    out = {"class": type(model).__name__}
    with torch.no_grad():
        out["logits"] = model(input_ids=x).logits
        out["tokens"] = model.generate(x[:1], max_new_tokens=6, do_sample=False)
        if mask is not None:  # a padded prompt, then one cached step, with the cache made as generate() / lazily
            out["masked_last"] = model(x, attention_mask=mask).logits[:, -1]
            for name, cache in (("config_cache", DynamicCache(config=model.config)), ("lazy_cache", DynamicCache())):
                prefix = model(x[:, :-1], attention_mask=mask[:, :-1], cache=cache, use_cache=True)
                out[name + "_length"] = prefix.cache.get_seq_length()
                step = model(x[:, -1:], attention_mask=mask, cache=prefix.cache, use_cache=True)
                out[name] = step.logits[:, -1]
    torch.save(out, out_file)
    """
)


def remote_outputs(model, x, tmp_path, mask=None) -> dict:
    """What ``model`` (or the checkpoint directory given), loaded with ``trust_remote_code`` in a process that
    cannot import llamaprune, computes on ``x``: logits, 6 greedy tokens of ``x[:1]`` and, given ``mask``, one
    cached step (REMOTE_SCRIPT)."""
    from llamaprune.io.pruned_checkpoint import save_pruned

    if isinstance(model, Path):
        checkpoint = model
    else:
        checkpoint = tmp_path / "remote-model"
        save_pruned(model, checkpoint)
    torch.save({"ids": x, "mask": mask}, tmp_path / "remote-inputs.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-I", "remote.py", str(checkpoint), "remote-inputs.pt", "remote-out.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "remote-out.pt")


# ---------------------------------------------------------------- hand-built run directories

ATTN, MLP, ATTN_FIXED, MLP_FIXED = 100, 10, 3, 2
FINGERPRINT = {"architecture": "LlamaForCausalLM", "config_hash": "cafe", "num_parameters": 0}


def write_run(
    run_dir,
    scores,
    *,
    kv=2,
    inter=4,
    heads=4,
    attn=ATTN,
    mlp=MLP,
    attn_fixed=ATTN_FIXED,
    mlp_fixed=MLP_FIXED,
    embed=None,
    influence=None,
):
    """A run directory from per-layer scores: ``scores[criterion][layer] = (attention scores, MLP scores)``.

    Every layer has ``kv`` groups of ``attn`` params and ``inter`` channels of ``mlp`` params; by default the
    embeddings make the total exactly 1000 for two layers, so ratio r means a budget of 1000 * r params."""
    run_dir = Path(run_dir)
    criteria = tuple(scores)
    n_layers = len(scores[criteria[0]])
    prunable = n_layers * (kv * attn + inter * mlp)
    embed = 1000 - prunable - n_layers * (attn_fixed + mlp_fixed) if embed is None else embed
    group_rows, layer_rows = [], []
    for layer in range(n_layers):
        for k, (kind, width, cost) in enumerate((("attn", kv, attn), ("mlp", inter, mlp))):
            group_rows += [
                {"group_id": f"layers.{layer}.{kind}.{i}", "layer": layer, "kind": kind, "index": i, "params": cost}
                | {c: float(scores[c][layer][k][i]) for c in criteria}
                for i in range(width)
            ]
        layer_rows.append(
            dict(
                layer=layer,
                num_attention_heads=heads,
                attn_groups=kv,
                mlp_channels=inter,
                attn_group_params=attn,
                mlp_group_params=mlp,
                attn_fixed_params=attn_fixed,
                mlp_fixed_params=mlp_fixed,
                block_influence=None if influence is None else influence[layer],
                **{c: float(sum(scores[c][layer][0]) + sum(scores[c][layer][1])) for c in criteria},
            )
        )
    fixed = embed + n_layers * (attn_fixed + mlp_fixed)
    meta = {
        "schema_version": 1,
        "fingerprint": {**FINGERPRINT, "num_parameters": prunable + fixed},
        "params": {"total": prunable + fixed, "prunable": prunable, "fixed": fixed},
        "hidden_size": 16,
        "head_dim": 4,
        "criteria": list(criteria),
        "calibration": None,
    }
    write_table(
        with_meta(pa.Table.from_pylist(group_rows, schema=groups_schema(criteria)), meta),
        run_dir / "groups.parquet",
    )
    write_table(
        with_meta(pa.Table.from_pylist(layer_rows, schema=layers_schema(criteria)), meta),
        run_dir / "layers.parquet",
    )
    atomic_write_json(run_dir / "manifest.json", {"schema_version": 1})
    return run_dir


def removed_ids(plan):
    """group_ids a plan removes, from its kept lists (independent of how the plan was made)."""
    out = set()
    for lp in plan.layers:
        out |= {f"layers.{lp.layer}.attn.{i}" for i in set(range(lp.num_key_value_heads)) - set(lp.attn_groups)}
        out |= {f"layers.{lp.layer}.mlp.{i}" for i in set(range(lp.intermediate_size)) - set(lp.mlp_channels)}
    return out


def params_removed(plan, attn=ATTN, mlp=MLP, attn_fixed=ATTN_FIXED, mlp_fixed=MLP_FIXED):
    """The accounting rule, recomputed: removed groups, plus the fixed params of every emptied sub-block."""
    total = 0
    for lp in plan.layers:
        total += (lp.num_key_value_heads - len(lp.attn_groups)) * attn
        total += (lp.intermediate_size - len(lp.mlp_channels)) * mlp
        total += attn_fixed * (lp.removed or "attention" in lp.skip)
        total += mlp_fixed * (lp.removed or "mlp" in lp.skip)
    return total


def check_accounting(plan, **costs):
    """A plan's params add up (docs/ARTIFACTS.md, "Plans"), stay within its target and pass its own checks."""
    removed = params_removed(plan, **costs)
    assert plan.params_before - plan.params_after == removed
    assert plan.achieved_ratio == pytest.approx(removed / plan.params_before, rel=1e-12)
    assert removed / plan.params_before <= plan.target_ratio
    plan.validate()


# Importance per parameter (attn costs 100, mlp 10): layer 0 is cheap to prune, layer 1 dear.
# Global order: l0.mlp.0 .1 .2 (.3) | l0.attn.1 (0.5) | l1.mlp.0 .1 .2 (.3) | l0.attn.0 (5) | l1.attn.0 ...
TAYLOR = [([500.0, 50.0], [1.0, 2.0, 3.0, 4.0]), ([800.0, 900.0], [10.0, 20.0, 30.0, 40.0])]


# ---------------------------------------------------------------- the CLI


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------- file-system conditions


@pytest.fixture
def read_only():
    """``read_only(path)`` makes a directory unwritable for this process: chmod for a user, ``chattr +i`` for root
    (whom no mode stops); the test is skipped where neither holds. Undone at teardown."""
    import subprocess

    made = []

    def undo(path):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            os.chmod(path, 0o755)

    def make(path):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        else:
            os.chmod(path, 0o555)
        made.append(path)
        try:
            (Path(path) / ".probe").touch()
        except OSError:
            return path
        (Path(path) / ".probe").unlink()
        pytest.skip("no way to make a directory read-only here")

    yield make
    for path in made:
        undo(path)


def calibration_text(directory, lines: int = 200) -> Path:
    """A small UTF-8 calibration / evaluation text file."""
    path = Path(directory) / "calib.txt"
    path.write_text("\n".join(VALID_TXT.read_text(encoding="utf-8").splitlines()[:lines]), encoding="utf-8")
    return path


class ForwardClock:
    """A stand-in for ``llamaprune.evaluate.perplexity``'s clock that only causal-LM forwards advance: by the model's
    parameters times its tokens (so a model's time is its size), times ``slow[i]`` for the i-th forward (another job
    slowing the machine then). ``models`` lists the model of each forward, in order."""

    def __init__(self, slow: dict[int, float] | None = None):
        self.now, self.slow, self.models = 0.0, slow or {}, []

    def perf_counter(self) -> float:
        return self.now

    def _hook(self, module, args, output):
        if hasattr(output, "logits"):  # the causal LM itself, not its base model or a layer
            factor = self.slow.get(len(self.models), 1.0)
            self.models.append(module)
            self.now += module.num_parameters() * output.logits.shape[:2].numel() * 1e-9 * factor

    @contextmanager
    def installed(self):
        import types

        from llamaprune.evaluate import perplexity

        real = perplexity.time
        perplexity.time = types.SimpleNamespace(perf_counter=self.perf_counter)
        handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            perplexity.time = real
