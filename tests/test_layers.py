"""The import graph of mfrnet_ds runs one way: a module imports only from its own layer or the layers below.

    config, presets <- raw <- shards, synth <- stream <- model <- engine <- eval, viz <- tracking <- trainer <- tools

Every import counts, also one inside a function: an import deferred for speed is still a dependency. The tools
(command-line modules and the package root) may import anything. A failure names the import and both layers:
move the code to the layer it belongs to instead of adding an exception here.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mfrnet_ds"

# viz (the expert picture) and viz_samples analyse a trained model on evaluation samples: the eval layer
LAYERS = ["config presets typed errors", "raw", "shards synth", "stream", "model", "engine", "eval viz viz_samples", "tracking",
          "trainer"]
RANK = {name: i for i, group in enumerate(LAYERS) for name in group.split()}
TOOLS = len(LAYERS)     # everything else: compare, export, plan, costs, viz, summary, ...


def layer_of(module: str) -> int:
    """mfrnet_ds.<top>[.x]: the layer of <top>; the package root and unlisted tops are tools."""
    parts = module.split(".")
    return RANK.get(parts[1], TOOLS) if len(parts) > 1 else TOOLS


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported mfrnet_ds module) for every import in the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mfrnet_ds"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mfrnet_ds":
                continue
            if target == "mfrnet_ds":   # `from mfrnet_ds import x`: x is a module or a root re-export
                found += [(node.lineno, f"mfrnet_ds.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def test_layer_table_names_real_packages():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert set(RANK) <= tops, f"layers that name nothing in mfrnet_ds/: {sorted(set(RANK) - tops)}"


def test_imports_run_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for line, target in imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer {layer_of(module)}) "
                              f"imports {target} (layer {layer_of(target)})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, target, upward", [
    ("mfrnet_ds.engine.step", "mfrnet_ds.stream.augment", False),
    ("mfrnet_ds.config", "mfrnet_ds.model.mfrnet", True),
    ("mfrnet_ds.tracking.mlflow", "mfrnet_ds.trainer.hooks", True),
    ("mfrnet_ds", "mfrnet_ds.trainer", False),
])
def test_the_rule_itself(module, target, upward):
    assert (layer_of(target) > layer_of(module)) is upward


# Sizes a newcomer can hold in their head (issue 14): a module that outgrows this is two modules, a function two
# functions. The margins over 400 and 60 are the "~" of the rule, not room to grow into.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 65


def test_modules_and_functions_stay_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {text.count(chr(10))} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_big.append(f"{rel}:{node.lineno}: {node.name} is {lines} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_big, "split these:\n" + "\n".join(too_big)
