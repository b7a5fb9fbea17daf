"""A property-based fuzz of plan JSON: mutate the fields, types and indices of a valid plan; every mutant either
applies to a model whose logits match the original with the plan's groups zeroed (and reads back exactly as
written: nothing coerced), or is refused with one line. Never a traceback, never a silently wrong model."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TOL, ids, logits, tiny_config, tiny_model, zeroed_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from llamaprune.apply.command import ApplyOptions, apply
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import plan_from_kept, plan_json, read_plan
from llamaprune.io.pruned_checkpoint import load_pruned

EXAMPLES = 300

SCALARS = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_infinity=True) | st.text(max_size=4)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                         max_size=2), max_leaves=4)
INDEX = st.integers(-2, 30) | SCALARS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-layer tiny checkpoint (no tokenizer: apply does not need one), its reference model and a valid plan."""
    path = tmp_path_factory.mktemp("fuzz") / "model"
    config = tiny_config(layers=3, vocab=48)
    tiny_model(config).save_pretrained(path)
    plan = plan_from_kept(config, [([1], [0, 4, 5, 20]), ([0, 1], [3, 7, 8]), ([0], list(range(0, 24, 3)))],
                          removed={2})
    return path, json.loads(plan_json(plan))


def mutate(data, doc: dict) -> None:
    """One edit of ``doc`` in place: a field replaced, dropped or added, a layer's index list edited, layers
    added, dropped or swapped."""
    layers = doc["layers"] if isinstance(doc.get("layers"), list) else []
    kind = data.draw(st.sampled_from(["top", "drop-top", "layer", "drop-layer-field", "indices", "layers", "skip"]))
    if kind == "top":
        doc[data.draw(st.sampled_from([*doc, "extra"]))] = data.draw(JSON)
    elif kind == "drop-top" and doc:
        doc.pop(data.draw(st.sampled_from(sorted(doc))))
    elif kind in ("layer", "drop-layer-field", "indices", "skip") and layers:
        entry = data.draw(st.sampled_from(layers))
        if not isinstance(entry, dict):
            return
        if kind == "layer":
            entry[data.draw(st.sampled_from([*entry, "extra"]))] = data.draw(JSON)
        elif kind == "drop-layer-field" and entry:
            entry.pop(data.draw(st.sampled_from(sorted(entry))))
        elif kind == "skip":
            entry["skip"] = data.draw(st.lists(st.sampled_from(["attention", "mlp", "bogus"]), max_size=2))
        else:
            key = data.draw(st.sampled_from(["attn_groups", "mlp_channels"]))
            indices = entry.get(key) if isinstance(entry.get(key), list) else []
            edit = data.draw(st.sampled_from(["insert", "remove", "replace", "duplicate", "reverse"]))
            if edit == "insert":
                indices.insert(data.draw(st.integers(0, len(indices))), data.draw(INDEX))
            elif indices and edit == "remove":
                indices.pop(data.draw(st.integers(0, len(indices) - 1)))
            elif indices and edit == "replace":
                indices[data.draw(st.integers(0, len(indices) - 1))] = data.draw(INDEX)
            elif indices and edit == "duplicate":
                indices.append(indices[-1])
            else:
                indices.reverse()
            entry[key] = indices
    elif kind == "layers" and layers:
        edit = data.draw(st.sampled_from(["append", "drop", "swap"]))
        if edit == "append":
            layers.append(copy.deepcopy(layers[-1]))
        elif edit == "drop":
            layers.pop(data.draw(st.integers(0, len(layers) - 1)))
        elif len(layers) > 1:
            layers[0], layers[1] = layers[1], layers[0]


def reads_back_as_written(doc: dict, path: Path) -> None:
    """The plan read is the JSON written: no field coerced (3.9 -> 3, "1" -> 1, "false" -> True)."""
    read = read_plan(path).to_dict()
    for key, value in doc.items():
        if key == "layers":
            for written, parsed in zip(value, read["layers"], strict=True):
                assert all(parsed[field] == item for field, item in written.items()), (written, parsed)
        elif key in read and value is not None:
            assert read[key] == value, (key, value, read[key])


def test_every_mutant_applies_correctly_or_is_refused_in_one_line(checkpoint):
    """Each mutant is applied correctly or refused; over the fuzz, both outcomes occur (a fuzz whose mutants were
    all refused, or all applied, would not test what it claims)."""
    model_dir, valid = checkpoint
    outcomes: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        doc = copy.deepcopy(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            mutate(data, doc)
        with tempfile.TemporaryDirectory() as tmp:
            path, out = Path(tmp) / "plan.json", Path(tmp) / "out"
            path.write_text(json.dumps(doc))
            try:
                apply(ApplyOptions(path, str(model_dir), out))
            except UsageError as err:
                assert "\n" not in str(err) and str(err), err
                assert not out.exists()
                outcomes["refused"] += 1
                return
            reads_back_as_written(doc, path)
            plan = read_plan(path)
            pruned, reference = load_pruned(out), AutoModelForCausalLM.from_pretrained(model_dir)
            x = ids(reference.config.vocab_size)
            with zeroed_reference(reference, plan):
                assert torch.allclose(logits(pruned, x), logits(reference, x), atol=TOL, rtol=0)
            assert pruned.num_parameters() == plan.params_after
            shutil.rmtree(out)
            outcomes["applied"] += 1

    fuzz()
    print(f"plan fuzz: {dict(outcomes)}")
    assert outcomes["refused"] and outcomes["applied"], outcomes
