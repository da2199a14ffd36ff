"""The package's structure: kernels stand alone, imports run one way, no cycles, small files.

Every import of every module is read from the source (module level and inside functions), so a
lazy import cannot hide a cycle or a dependency that points up the layers.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"freezeasguard.engine": ROOT / "engine", "freezeasguard.kernels": ROOT / "kernels"}

# Lowest first. A module may import from layers below its own and from its own subpackage only.
LAYERS = [
    {"freezeasguard.engine.version", "freezeasguard.engine.errors", "freezeasguard.engine.io", "freezeasguard.kernels"},
    {"freezeasguard.engine.config", "freezeasguard.engine.backends"},
    {"freezeasguard.engine.model", "freezeasguard.engine.guard", "freezeasguard.engine.optim"},
    {"freezeasguard.engine.train"},
    {"freezeasguard.engine.learn", "freezeasguard.engine.service"},
    {"freezeasguard.engine.cli"},
]
# Imported inside functions only where they may be absent or unusable here.
OPTIONAL_BACKENDS = {"triton", "xformers", "bitsandbytes", "pynvml"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel)).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in a file; ``from a import b``
    yields ``a.b`` when that is a module of the package, else ``a``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level `if` count as module level
        if isinstance(node, ast.If):
            top |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in MODULES else node.module, id(node) in top, node.lineno))
    return found


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the unit that owns the module: a subpackage, or the module itself)."""
    for i, layer in enumerate(LAYERS):
        for unit in sorted(layer, key=len, reverse=True):
            if module == unit or (module.startswith(unit + ".") and unit != "freezeasguard.engine"):
                return i, unit
    return 0, module  # freezeasguard.engine.<root module> not listed above


def test_the_package_has_the_modules_this_test_reads():
    assert len(MODULES) > 40
    assert "freezeasguard.engine.train.trainer" in MODULES and "freezeasguard.kernels.adamw" in MODULES


def test_kernels_import_only_torch_triton_and_themselves():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("freezeasguard.kernels"):
            continue
        for target, _, line in _imports(path):
            head = target.split(".")[0]
            ok = (target.startswith("freezeasguard.kernels") or head in ("torch", "triton", "__future__")
                  or head in stdlib)
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "kernels/ must stand alone:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package's __init__ importing nothing of its own is what keeps parents out of the cycles.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_run_one_way_down_the_layers():
    bad = []
    for name, path in MODULES.items():
        layer, unit = _layer(name)
        for target, _, line in _imports(path):
            if target not in MODULES or target == name:
                continue
            t_layer, t_unit = _layer(target)
            if t_unit == unit or t_layer < layer or target == "freezeasguard.engine":
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {unit} (layer {layer}) imports {target} (layer {t_layer})")
    assert not bad, "imports must point down the layers:\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    bad = [f"{p.relative_to(ROOT)}:{line}" for n, p in MODULES.items() if not n.startswith("freezeasguard.engine.cli")
           for t, _, line in _imports(p) if t.startswith("freezeasguard.engine.cli")]
    assert not bad, bad


# The command line imports torch, diffusers and the engine inside each command, after its
# arguments and config are checked: importing them takes seconds, and a typo or a wrong flag
# should be reported at once (CLI start-up time). Everything below the CLI imports at module level.
LAZY_IMPORTS = "freezeasguard.engine.cli"


def test_imports_sit_at_module_level_except_optional_backends():
    bad = []
    for name, path in MODULES.items():
        if name == LAZY_IMPORTS or name.startswith(LAZY_IMPORTS + "."):
            continue
        for target, top, line in _imports(path):
            if not top and target.split(".")[0] not in OPTIONAL_BACKENDS:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["engine", "kernels", "bench"])
def test_files_stay_small(folder):
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines (usually two jobs): {big}"


# Test files that check the project as a whole rather than one module.
WHOLE_PROJECT_TESTS = {"layout", "packaging", "readme", "redteam", "redteam_delta", "redteam_inputs", "families_e2e"}


def test_every_test_file_is_named_after_what_it_tests():
    """``tests/test_<name>.py``: ``<name>`` starts with a module's name, or its subpackage's and then
    its own (``test_optim_flat`` for engine/optim/flat.py, ``test_bench_guard`` for bench/guard.py), or
    a subpackage's (``test_cli_tree``); the whole-project suites are listed above."""
    units = set()
    for folder in (ROOT / "engine", ROOT / "kernels", ROOT / "bench"):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            pkg = parts[-2] if len(parts) > 1 else ""
            units |= {parts[-1], f"{pkg}_{parts[-1]}", pkg} - {"", "__init__", "__main__"}
    bad = []
    for test in sorted((ROOT / "tests").glob("test_*.py")):
        name = test.stem.removeprefix("test_")
        if name in WHOLE_PROJECT_TESTS:
            continue
        words = name.split("_")
        if not any("_".join(words[:i]) in units for i in range(1, len(words) + 1)):
            bad.append(test.name)
    assert not bad, f"test files that name no module (rename them, or list a whole-project suite): {bad}"
