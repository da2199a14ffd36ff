"""The README's commands and examples run as written.

The blocks are read from README.md itself, so they cannot drift from what is tested. Only step
counts are scaled down (``--steps N``, ``--bootstrap-steps N``, ``steps: N`` and ``steps=N``, as in
``train.steps=N`` or a keyword argument):
the default run gives every count the least that still exercises its command (N // 10, between 2
and 4, so a run that is resumed or extended still has steps to add), and the slow run (``-m slow``)
runs the first run at a tenth of its counts; every command, flag, file and folder is the README's own.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, text) of the fenced blocks under a ``## section`` heading, in order."""
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    body = README[start:end if end >= 0 else None]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


def _commands(text: str) -> list[str]:
    """Shell commands of a bash block: comments dropped, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [ln.split("  #")[0].strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _fewer_steps(text: str, most: int = 4) -> str:
    """Every step count N becomes N // 10, at least 2 and at most ``most``."""
    def scale(m: re.Match) -> str:
        return f"{m.group(1)}{min(most, max(2, int(m.group(2)) // 10))}"

    return re.sub(r"(--steps |--bootstrap-steps |\bsteps: |\bsteps=)(\d+)", scale, text)


def _run(cmd: str, cwd: Path, env: dict, *, in_process: bool, timeout: int = 900) -> subprocess.CompletedProcess:
    """One README command, in a shell as written, or, for ``freezeasguard ...`` lines, through the
    console script's own ``main`` in this process (what the script calls; it saves the 5-10 s of
    importing torch and diffusers that every new process pays)."""
    argv = shlex.split(cmd)
    if not in_process or argv[0] != "freezeasguard" or set("|&;<>$`") & set(cmd):
        return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    from freezeasguard.engine.cli.main import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv[1:])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def test_the_two_commands_are_the_ones_ci_runs():
    main_job, tests, slow = [_commands(t)[0] for lang, t in _blocks("Two commands") if lang == "bash"]
    ci = (ROOT / ".ci" / "run").read_text()
    install, test_cmd = tests.rsplit(" && ", 1)
    assert install in ci and f"\n{test_cmd} " in ci and f"\n{slow} " in ci, (install, test_cmd, slow)
    assert slow == f"{test_cmd} -m slow"
    assert main_job == f"{install.replace('[all,dev]', '[all]')} && python bench/run.py"


@pytest.mark.parametrize("most", [pytest.param(4, id="least"), pytest.param(10**6, marks=pytest.mark.slow, id="tenth")])
def test_first_run_end_to_end_as_written(tmp_path, most):
    """Every command of the first run, in order. The default run calls the console script's ``main``
    in this process with the least step counts; the slow run starts every command in a shell, as a
    newcomer does, at a tenth of the README's counts."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    ran = []
    for lang, text in _blocks("A first run, end to end"):
        if lang == "yaml":
            name = text.splitlines()[0].removeprefix("#").strip()
            (tmp_path / name).write_text(_fewer_steps(text, most))
            continue
        for cmd in _commands(_fewer_steps(text, most)):
            out = _run(cmd, tmp_path, env, in_process=most == 4)
            assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            ran.append((cmd, out))
    assert len(ran) >= 14
    for f in ("three.png", "mask.json", "mask.random.json", "mask.png", "policy.yaml", "runs/base/final/unet",
              "runs/ft/final/unet", "runs/guarded/final/unet", "runs/jobs/my-eights/delta.safetensors",
              "runs/lock/manifest.json", "runs/lock/manifest.locks.safetensors", "runs/lock/report.png",
              "runs/locked/final/unet", "runs/jobs/my-eights-locked/delta.safetensors"):
        assert (tmp_path / f).exists(), f
    said = {cmd.split()[1]: out.stdout for cmd, out in ran}
    mask_proof, lock_proof = [out.stdout for cmd, out in ran if cmd.split()[1] == "verify"]
    assert "frozen tensors are bit-identical" in mask_proof and "chain intact" in said["audit"]
    assert "no tensor is frozen by this manifest" in lock_proof and "locked tensors within tolerance" in lock_proof
    assert "locks_checked" in (tmp_path / "runs/jobs/my-eights-locked/record.json").read_text()
    assert "resumed from step 2" in [out.stdout for cmd, out in ran if "--resume" in cmd][0]


def test_model_families_example_as_written(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmds = ["freezeasguard export-digits --out data/digits"]
    cmds += [c for lang, t in _blocks("Model families") if lang == "bash" for c in _commands(_fewer_steps(t))]
    for cmd in cmds:
        out = _run(cmd, tmp_path, env, in_process=True, timeout=600)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    final = tmp_path / "runs/flux/final"
    assert (final / "transformer").is_dir() and (final / "text_encoder_2").is_dir() and (tmp_path / "flux.png").is_file()
    assert '"FluxPipeline"' in (final / "model_index.json").read_text()


@pytest.mark.slow
def test_fsdp_example_as_written(tmp_path):
    """The torchrun command of 'More than one GPU': 2 gloo processes shard flux-tiny; the run's
    proof holds and the saved transformer is a plain diffusers one (not FSDP's wrapper class)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmds = ["freezeasguard export-digits --out data/digits"]
    cmds += [c for lang, t in _blocks("More than one GPU: DDP and FSDP2") if lang == "bash"
             for c in _commands(_fewer_steps(t))]
    assert any(c.startswith("torchrun ") and "train.parallel=fsdp" in c for c in cmds), cmds
    for cmd in cmds:
        out = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert "returned a view tensor" not in out.stderr  # FSDP2's warning, checked away (train.fsdp)
    final = tmp_path / "runs/flux-fsdp/final"
    assert json.loads((final / "verify.json").read_text())["ok"] is True
    assert json.loads((final / "transformer" / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    log = [json.loads(ln) for ln in (tmp_path / "runs/flux-fsdp/log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == 2


def test_python_api_examples_as_written_each_on_its_own(tmp_path, monkeypatch):
    code, lock_code = [t for lang, t in _blocks("Python API") if lang == "python"]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_fewer_steps(code), "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["trainer"].verify_frozen().ok and (tmp_path / "runs" / "api" / "final" / "unet").is_dir()
    scope = {}  # the lock block says it runs on its own: it gets nothing from the first
    exec(compile(_fewer_steps(lock_code), "README.md", "exec"), scope)  # noqa: S102 - its lock example
    report = scope["trainer"].verify_frozen()
    assert report.ok and report.locks_checked == len(scope["learned"].lock) > 0


def test_no_placeholder_is_left_in_the_readme():
    left = [ln for ln in README.splitlines() if re.fullmatch(r"[A-Z][A-Z0-9_]{5,}", ln.strip())]
    assert not left, left


def test_every_dotted_name_in_the_readme_resolves():
    names = set(re.findall(r"freezeasguard\.(?:engine|kernels)(?:\.\w+)*", README))
    assert len(names) > 5
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 1, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"README names {name}: {'.'.join(parts[:i])} has no {attr!r}"
                obj = getattr(obj, attr)
            break
        else:
            raise AssertionError(f"README names {name}, which does not import")
