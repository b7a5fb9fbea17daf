"""Model sources, cache location, architecture check, config fingerprint and loading."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_config, tiny_model

import llamaprune.io.loading as model_module
from llamaprune.core.groups import config_fingerprint
from llamaprune.io.loading import Source, cache_dir, load_model, resolve_device, resolve_source

# --- resolve_source -----------------------------------------------------------------------------


def test_resolve_source_checkpoint_dir(tiny_checkpoint):
    assert resolve_source(str(tiny_checkpoint)) == Source(str(tiny_checkpoint), "dir", str(tiny_checkpoint))


def test_resolve_source_missing_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"model not found: {missing}; give a checkpoint directory"):
        resolve_source(missing)


@pytest.mark.parametrize("name", ["./no-such-model", "a/b/c", "plainname"])
def test_resolve_source_names_that_are_not_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_source(name)


def test_resolve_source_dir_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_source(str(tmp_path / "weights"))


def test_resolve_source_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*model\.gguf"):
        resolve_source(str(tmp_path / "model.gguf"))


def test_resolve_source_gguf_file(tmp_path):
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == Source(str(gguf), "gguf", str(tmp_path), gguf_file="model.Q4.gguf")


def test_resolve_source_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == Source(
        "HuggingFaceTB/SmolLM2-135M", "hub", "HuggingFaceTB/SmolLM2-135M"
    )


def test_unreachable_hub_id_is_a_value_error(tmp_path, monkeypatch):
    """Offline or unknown ids surface as one clear ValueError, not transformers' OSError."""
    import transformers

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection."
        )

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(
        ValueError, match=r"could not load the config of some-org/some-model: We couldn't"
    ) as err:
        load_model("some-org/some-model")
    assert "\n" not in str(err.value)


# --- cache directory ----------------------------------------------------------------------------


def test_cache_dir_prefers_llamaprune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAPRUNE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_uses_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAPRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llamaprune"


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAPRUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "llamaprune"


def test_embedded_checkpoint_is_built_once_by_concurrent_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAPRUNE_CACHE", str(tmp_path))
    builds, start = [], threading.Barrier(2)

    def slow_build(target):
        builds.append(target)
        time.sleep(0.3)  # the other caller arrives while this build runs
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    def first_use():
        start.wait()
        return model_module.embedded_checkpoint()

    monkeypatch.setattr(model_module, "_build_embedded", slow_build)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: first_use(), range(2)))
    assert paths == [tmp_path / "smollm2-135m"] * 2
    assert builds == [tmp_path / "smollm2-135m"]


# --- architecture, fingerprint, loading ---------------------------------------------------------


def test_unsupported_architecture_is_named(gpt2_checkpoint):
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel") as err:
        load_model(str(gpt2_checkpoint))
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM"):
        assert supported in str(err.value)


@pytest.mark.parametrize("config_class, arch", [("Phi3Config", "Phi3ForCausalLM"),  # fused qkv
                                                ("MixtralConfig", "MixtralForCausalLM"),  # mixture of experts
                                                ("T5Config", "T5ForConditionalGeneration")])  # encoder-decoder
def test_fused_expert_and_encoder_decoder_models_are_one_line(tmp_path, config_class, arch):
    import transformers

    config = getattr(transformers, config_class)(architectures=[arch])
    config.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"unsupported architecture {arch}; llamaprune supports Llama") as err:
        load_model(str(tmp_path / "m"))
    assert "\n" not in str(err.value)


def test_config_fingerprint_is_stable_and_shape_sensitive():
    base = config_fingerprint(tiny_config())
    assert base == config_fingerprint(tiny_config())
    assert base["architecture"] == "LlamaForCausalLM"
    assert base["num_parameters"] == tiny_model(tiny_config()).num_parameters()
    others = [
        config_fingerprint(tiny_config(intermediate=16)),
        config_fingerprint(tiny_config(kv_heads=1)),
        config_fingerprint(tiny_config(layers=3)),
        config_fingerprint(tiny_config(bias=True)),
    ]
    assert len({base["config_hash"], *(f["config_hash"] for f in others)}) == 5
    assert config_fingerprint(tiny_config(model_type="mistral"))["architecture"] == "MistralForCausalLM"


def test_load_model_float32_gives_the_saved_weights(tiny_checkpoint, tokenizer):
    loaded = load_model(str(tiny_checkpoint))
    expected = tiny_model(tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2)).state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert loaded.source.kind == "dir"
    assert len(loaded.tokenizer) == len(tokenizer)


def test_load_model_bfloat16(tiny_checkpoint, tokenizer):
    loaded = load_model(str(tiny_checkpoint), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert not loaded.model.training
    ids = torch.tensor([tokenizer("The game began", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits.float()).all()


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="--device cuda.*no CUDA device; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")


def test_a_model_type_transformers_does_not_know_is_an_unsupported_architecture(tmp_path):
    (tmp_path / "foo").mkdir()
    (tmp_path / "foo" / "config.json").write_text('{"model_type": "foo", "architectures": ["FooForCausalLM"]}')
    with pytest.raises(ValueError, match="unsupported architecture FooForCausalLM; llamaprune supports Llama") as err:
        load_model(str(tmp_path / "foo"))
    assert "\n" not in str(err.value)
    (tmp_path / "foo" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_model(str(tmp_path / "foo"))
