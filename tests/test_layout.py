"""The package's layout is a contract (docs/ARCHITECTURE.md): folders by phase, each importing only downward,
no import circle through any import statement (function-level and TYPE_CHECKING ones included), a torch-free
core and planner, and the decoder layer's module names written only in the layer table."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llamaprune"
# Lowest first: a module imports only from its own folder and from folders before it.
ORDER = ("core", "io", "runs", "evaluate", "scoring", "plan", "recover", "apply", "export", "seed", "cli")
TOP_LEVEL = {"__init__.py", "__main__.py", "modeling_llamaprune.py"}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that ``path`` imports anywhere in it: ``from a.b import c`` counts a.b.c when that is
    a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else None


def test_the_helpers_find_a_circle_and_a_function_level_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from llamaprune.core import errors\n")
    assert imports(source, {"llamaprune.core": source, "llamaprune.core.errors": source}) == {"llamaprune.core.errors"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_each_folder_imports_only_downward():
    upward = []
    for module, targets in graph().items():
        if module.endswith("modeling_llamaprune"):
            assert not targets, "the modeling file is copied into checkpoints: it imports no llamaprune"
            continue
        source = folder(module)
        for target in targets:
            goal = folder(target)
            if source is None or goal is None or goal == source:
                continue
            if ORDER.index(goal) > ORDER.index(source):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_top_level_holds_only_the_entry_points_and_folders():
    files = {path.name for path in PACKAGE.iterdir() if path.is_file() and path.suffix == ".py"}
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert files == TOP_LEVEL
    assert folders == set(ORDER)


@pytest.mark.parametrize("part", ["core", "plan"])
def test_torch_free_parts_import_no_torch(part):
    names = sorted(name for name in modules() if name.startswith(f"llamaprune.{part}"))
    code = (
        "import sys, importlib\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    statements = [
        f"{path.name}: {line.strip()}"
        for name, path in modules().items() if name.startswith(f"llamaprune.{part}")
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.match(r"\s*(import|from)\s+(torch|transformers|safetensors)\b", line)
    ]
    assert statements == []  # not even inside a function


def test_the_decoder_layout_is_written_only_in_the_layer_table():
    """The decoder layer's module names appear in code only in core/arch.py and the standalone modeling file."""
    names = re.compile(r"""["'][\w.]*\b(self_attn|o_proj|down_proj|gate_proj|up_proj|q_proj|k_proj|v_proj|"""
                       r"""input_layernorm|post_attention_layernorm)\b""")
    found = []
    for name, path in modules().items():
        if name in ("llamaprune.core.arch", "llamaprune.modeling_llamaprune"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in (
                "self_attn", "o_proj", "down_proj", "gate_proj", "up_proj", "q_proj", "k_proj", "v_proj",
                "input_layernorm", "post_attention_layernorm", "act_fn",
            ):
                found.append(f"{name}:{node.lineno} .{node.attr}")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and names.search(repr(node.value))):
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert found == []
