"""The package's layers, read from the source (ast): which layer may import which, no import
cycle inside the package, and no module-level torch import on the torch-free path.

See docs/architecture.md ("Where the code is") for the layers and why they are cut there."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fastmerge"

# Modules every layer may use: version, lazy loading, the compiled extensions, the kernel ABI.
BASE = {"_version", "_lazy", "_ext", "abi", "_C", "_core", "_cuda"}
# layer -> the layers it may import (besides itself and BASE); a layer is the first name
# under fastmerge/ (a subpackage or a top-level module)
ALLOWED = {
    "methods": set(),
    "reference": {"methods"},
    "planning": {"methods"},
    "backends": {"methods", "planning"},
    "checkpoint": {"methods"},
    "recipe": {"methods"},
    "output": {"methods", "checkpoint", "recipe"},
    "pipeline": {"methods", "planning", "backends", "checkpoint", "recipe", "output"},
    "api": {"methods", "planning", "backends", "reference"},
    "testing": {"methods", "reference", "planning", "backends"},
    "integrations": {"methods", "planning", "backends", "api", "reference", "testing"},
    "cli": {"methods", "planning", "backends", "checkpoint", "recipe", "output", "pipeline",
            "api", "integrations"},
    "__init__": {"backends"},        # registers the torch.library ops when torch is loaded
    "__main__": {"cli"},
}
for _base in BASE:
    ALLOWED.setdefault(_base, set())

# What `fastmerge merge` imports on the CPU before it knows it needs torch (it never does for
# the methods _core binds): none of these may import torch at module level.
TORCH_FREE = [
    "__init__", "_lazy", "_version", "_ext", "abi",
    "methods/__init__", "methods/lines", "methods/rng", "methods/kernel_params",
    "planning/__init__", "planning/planner", "planning/thresholds", "planning/radix",
    "backends/__init__", "backends/cpu/__init__",
    "checkpoint/__init__", "checkpoint/safetensors_file", "checkpoint/hub", "checkpoint/libc",
    "checkpoint/sources", "checkpoint/bin_file", "checkpoint/embeddings", "checkpoint/lora",
    "checkpoint/row_map", "pipeline/vocabulary",
    "recipe/__init__", "recipe/config", "recipe/slices",
    "output/__init__", "output/writer", "output/report", "output/model_card",
    "pipeline/__init__", "pipeline/native", "pipeline/driver", "pipeline/core_kernels",
    "pipeline/inputs", "pipeline/budget", "pipeline/dry_run", "pipeline/sliced",
    "pipeline/stored_output",
    "pipeline/launch_env",
    "cli/__init__",
    # mergekit's methods: schemas and linear-combination coefficients without torch (their
    # float32 references reach torch through methods/lazy_torch.py, on first use)
    "methods/lazy_torch", "methods/schema", "methods/core", "methods/mergekit_methods",
    "methods/slerp", "methods/karcher", "methods/model_stock", "methods/della", "methods/sce",
    "methods/nearswap", "methods/arcee_fusion", "methods/ram", "methods/passthrough",
    "recipe/mergekit_params", "pipeline/method_pass", "pipeline/della_pass", "backends/cpu/della",
    "pipeline/reduce_state",
]


def _modules() -> dict[str, Path]:
    """dotted name under fastmerge (``pipeline.driver``, ``methods``) -> file."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _known(dotted: str) -> bool:
    rel = dotted[len("fastmerge."):]
    return rel in MODULES or rel in BASE


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """The fastmerge modules ``name`` imports (function-local imports included unless
    ``module_level_only``), as dotted names under fastmerge."""
    tree = ast.parse(MODULES[name].read_text())
    here = [] if name == "__init__" else name.split(".")
    package = here if _is_package(name) or name == "__init__" else here[:-1]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # module level includes if/try blocks, not def/class bodies
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                stack.extend(ast.iter_child_nodes(node))
    found = set()
    for node in nodes:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "fastmerge":
                mod = node.module[len("fastmerge."):] if node.module != "fastmerge" else ""
            else:
                continue
            mod = "fastmerge" + ("." + mod if mod else "")
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if _known(f"{mod}.{a.name}") else mod
                       for a in node.names]
        for t in targets:
            if t.split(".")[0] != "fastmerge":
                continue
            rel = t[len("fastmerge."):] if t != "fastmerge" else "__init__"
            if rel in MODULES:
                found.add(rel)
            elif rel.split(".")[0] in BASE:
                found.add(rel.split(".")[0])
    found.discard(name)
    return found


def _layer(name: str) -> str:
    return name.split(".")[0]


def _torch_at_module_level(name: str) -> bool:
    tree = ast.parse(MODULES[name].read_text())
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "torch" for a in node.names):
            return True
        elif isinstance(node, ast.ImportFrom) and not node.level and \
                (node.module or "").split(".")[0] == "torch":
            return True
    return False


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layer_imports_only_below(name):
    layer = _layer(name)
    assert layer in ALLOWED, f"fastmerge/{name}: a module outside the known layers; add it"
    allowed = ALLOWED[layer] | BASE | {layer}
    # the package's own __init__ is lazy: importing it (for __version__) pulls in nothing
    wrong = sorted(m for m in _imports(name) if _layer(m) not in allowed | {"__init__"})
    assert not wrong, f"fastmerge.{name} (layer {layer}) imports {wrong}"


def test_no_import_cycle():
    """Function-local imports count: a cycle through them is still a cycle (backends and
    triton imported each other that way)."""
    graph = {name: _imports(name) - {"__init__"} for name in MODULES}
    state, cycle = {}, []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt])
                return True
            if nxt not in state and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_torch_free_path_lists_real_modules():
    for name in TORCH_FREE:
        dotted = name.replace("/__init__", "").replace("/", ".")
        assert dotted in MODULES, f"TORCH_FREE names fastmerge/{name}.py, which does not exist"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_path_never_imports_torch_at_module_level(name):
    dotted = name.replace("/__init__", "").replace("/", ".")
    assert not _torch_at_module_level(dotted), f"fastmerge/{name}.py imports torch"
    free = {n.replace("/__init__", "").replace("/", ".") for n in TORCH_FREE}
    pulled = sorted(m for m in _imports(dotted, module_level_only=True)
                    if m not in free and m not in ("_C", "_core", "_cuda"))
    assert not pulled, f"fastmerge/{name}.py imports {pulled} at module level (not torch-free)"


def test_no_backend_imports_the_reference():
    """The oracle is independent: no backend (nor the planning they share) calls it."""
    for name in MODULES:
        if _layer(name) in ("backends", "planning", "pipeline", "methods"):
            assert "reference" not in _imports(name), f"fastmerge.{name} imports the reference"
