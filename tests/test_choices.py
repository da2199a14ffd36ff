"""Each closed choice (optimizer-state kinds, kernel backends) is defined once, in kernels/choices.py,
and every place that accepts one reads that definition: adding or dropping a value there is the
only edit, and no second spelling of the set is left anywhere to disagree with it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from freezeasguard.engine.config import resolve
from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.optim import states
from freezeasguard.engine.optim.flat import resolve_flat_backend
from freezeasguard.engine.service import caps
from freezeasguard.engine.service.policy import Policy
from freezeasguard.engine.train.memplan import memory_plan
from freezeasguard.kernels import _triton, adamw_lowp
from freezeasguard.kernels.choices import ADAMW_BACKENDS, BACKENDS, COMPACT_STATE_KINDS, STATE_KINDS

ROOT = Path(__file__).resolve().parents[1]
SETS = {"STATE_KINDS": STATE_KINDS, "COMPACT_STATE_KINDS": COMPACT_STATE_KINDS, "BACKENDS": BACKENDS,
        "ADAMW_BACKENDS": ADAMW_BACKENDS}


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        resolve(preset="tiny", overrides=["freeze.mode=engine", *overrides])
    return str(err.value)


def test_the_config_accepts_exactly_the_state_kinds_and_says_which():
    for kind in STATE_KINDS:
        assert resolve(preset="tiny", overrides=["freeze.mode=engine", f"train.optimizer_states={kind}"]) \
            .train.optimizer_states == kind
    msg = _config_error("train.optimizer_states=int4")
    listed = re.search(r"train\.optimizer_states must be (\S+), got 'int4'", msg)
    assert listed and tuple(listed.group(1).split("|")) == STATE_KINDS, msg
    msg = _config_error("freeze.mode=naive", f"train.optimizer_states={COMPACT_STATE_KINDS[-1]}")
    compact = re.search(r"train\.optimizer_states=(\S+) needs freeze\.mode=engine", msg)
    assert compact and tuple(compact.group(1).split("|")) == COMPACT_STATE_KINDS, msg


def test_policy_and_caps_read_the_one_tuple():
    assert caps.CHOICES["optimizer_states"] is STATE_KINDS
    ok = Policy(optimizer_states=list(STATE_KINDS)).problems()
    assert not [p for p in ok if p.startswith("optimizer_states")]
    bad = [p for p in Policy(optimizer_states=["int4"]).problems() if p.startswith("optimizer_states")]
    assert bad == [f"optimizer_states must be a non-empty subset of {list(STATE_KINDS)}"]


@pytest.mark.parametrize("kind", STATE_KINDS)
def test_every_kind_has_its_storage_its_kernel_and_its_plan(kind):
    assert states.check_kind(kind) == kind
    held = states.new_states(kind, 1000, torch.device("cpu"))
    assert states.state_bytes(kind, 1000) == sum(t.numel() * t.element_size() for t in held.values())
    assert adamw_lowp.state_bytes_per_element(kind) > 0 and adamw_lowp.bytes_per_element_lowp(kind) > 0
    choices, eager = states.backend_choices(kind)
    assert set(BACKENDS) <= set(choices) <= set(ADAMW_BACKENDS) and eager in choices
    assert resolve_flat_backend("auto", torch.device("cpu"), kind)[0] == eager
    model = torch.nn.Sequential(torch.nn.Linear(4, 300), torch.nn.Linear(300, 2))
    assert memory_plan(model, [], mode="engine", states=kind).states == kind


def test_tables_keyed_by_kind_cover_exactly_the_kinds():
    assert tuple(adamw_lowp.MOMENT_BYTES) == STATE_KINDS
    for refuse in (states.check_kind, adamw_lowp.state_bytes_per_element,
                   lambda k: memory_plan(torch.nn.Linear(2, 2), [], states=k)):
        with pytest.raises(ValueError, match="must be one of"):
            refuse("int4")


def test_one_resolver_reads_every_backend_name():
    cpu = torch.device("cpu")
    assert _triton.resolve_backend("auto", cpu, "x") == ("torch", "cpu")  # never the interpreter unasked
    assert _triton.resolve_backend("auto", cpu, "x", choices=ADAMW_BACKENDS, eager="torch_fused")[0] == "torch_fused"
    for name in BACKENDS[1:]:
        if name != "triton" or _triton.blocker(cpu) is None:  # the interpreter, where tests have it
            assert _triton.resolve_backend(name, cpu, "x") == (name, "requested")
    with pytest.raises(ValueError, match=re.escape(f"x backend must be one of {BACKENDS}")):
        _triton.resolve_backend("torch_fused", cpu, "x")


def _sources() -> list[Path]:
    return sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def test_no_second_spelling_of_a_choice():
    """A literal tuple/list/set of exactly one of the choices' values, or the values joined with
    '|' in code (docstrings aside), outside kernels/choices.py is a second definition that would not
    follow an edit."""
    found = []
    for path in _sources():
        if path == ROOT / "kernels" / "choices.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if id(node) in docs:
                continue
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts \
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = {e.value for e in node.elts}
                hits = [n for n, s in SETS.items() if values == set(s)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                hits = [n for n, s in SETS.items() if "|".join(s) in node.value]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} spells {h}" for h in hits]
    assert not found, "\n".join(found)


def test_only_the_resolver_reads_auto():
    """Every launcher hands its backend name to ``_triton.resolve_backend``; none compares it to
    'auto' itself (which is how two meanings of 'auto' came about)."""
    found = []
    for path in _sources():
        if path == ROOT / "kernels" / "_triton.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and "backend" in node.left.id \
                    and any(isinstance(c, ast.Constant) and c.value == "auto" for c in node.comparators):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
