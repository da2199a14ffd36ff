"""Learning direction locks: the direction choice, rounds, resume, the CLI, signing and verify."""
import json

import pytest
import torch

from freezeasguard.engine.cli.main import main as cli_main
from freezeasguard.engine.errors import ConfigError, MaskLearnError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.learn import subspace as sub
from freezeasguard.engine.learn.lock_config import LockLearnConfig
from freezeasguard.engine.model.components import build_components, save_components
from freezeasguard.engine.model.data import digits_dataset, write_image_folder


def _energy(dirs, d):
    return float((dirs.mT @ d).square().sum() / d.square().sum())


def test_energy_directions_are_the_top_singular_vectors_outside_the_current_lock():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 30, generator=g, dtype=torch.float64)
    dirs, share = sub.new_directions(d, None, 3)
    u, s, _ = torch.linalg.svd(d)
    assert torch.allclose(dirs @ dirs.mT, u[:, :3] @ u[:, :3].mT, atol=1e-10)  # the same subspace
    assert share == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-10)
    # with a current lock: new directions are orthogonal to it and the best of what is left
    cur = u[:, :2].float()
    more, _ = sub.new_directions(d, cur, 2)
    assert float((cur.double().mT @ more).abs().max()) < 1e-6
    assert torch.allclose(more @ more.mT, u[:, 2:4] @ u[:, 2:4].mT, atol=1e-5)


def test_contrast_directions_avoid_what_the_innocent_update_uses():
    # illegal energy along e0 (large) and e1 (smaller); innocent energy along e0 only
    g = torch.Generator().manual_seed(1)
    d = torch.zeros(6, 40, dtype=torch.float64)
    d[0] = 5 * torch.randn(40, generator=g, dtype=torch.float64)
    d[1] = 2 * torch.randn(40, generator=g, dtype=torch.float64)
    di = torch.zeros(6, 40, dtype=torch.float64)
    di[0] = 5 * torch.randn(40, generator=g, dtype=torch.float64)
    plain, _ = sub.new_directions(d, None, 1)
    contrast, _ = sub.new_directions(d, None, 1, d_innocent=di, ridge=0.01)
    assert abs(float(plain[0, 0])) > 0.99  # energy alone picks e0, which the innocent update uses
    assert abs(float(contrast[1, 0])) > 0.99  # the contrast picks e1: illegal energy, no innocent
    assert _energy(contrast, di) < 1e-3 < _energy(plain, di)


def test_the_rank_is_spread_over_the_rounds():
    assert [sub._cum(10, k, 3) for k in range(3)] == [3, 7, 10]
    assert [sub._cum(1, k, 3) for k in range(3)] == [0, 1, 1]


def test_config_is_checked():
    with pytest.raises(ConfigError, match="side must be one of"):
        LockLearnConfig(side="left").validate()
    with pytest.raises(ConfigError, match="budget must be in"):
        LockLearnConfig(budget=1.0).validate()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockworld")
    ds = digits_dataset(16, classes=(0, 1))
    c = build_components("tiny", seed=0)
    save_components(c, root / "base")
    write_image_folder(ds.subset(range(16)), root / "data")
    return root, c, ds


def _cfg(root, **kw):
    d = dict(base=str(root / "base"), illegal=["zero"], innocent=["one"], budget=0.25, rounds=2, steps=2,
             progress=False, device="cpu", num_threads=1)
    d.update(kw)
    cfg = LockLearnConfig(**d)
    cfg.user.batch_size = 4
    return cfg


def test_rounds_lock_the_budget_and_a_killed_run_resumes_to_the_same_lock(world, tmp_path, monkeypatch):
    root, c, ds = world
    full = sub.learn_lock(_cfg(root), tmp_path / "a", components=c, dataset=ds)
    assert [r["round"] for r in full.rounds] == [1, 2]
    counts = full.manifest.locks["counts"]
    assert 0.2 < counts["matrix_ratio"] < 0.3 and counts["dof"] == full.lock.dof
    for n, lk in full.lock.locks.items():  # each matrix: round(0.25 * rows) orthonormal output directions
        assert lk.inp is None and lk.out.shape[1] == round(0.25 * lk.m)
        assert torch.allclose(lk.out.mT @ lk.out, torch.eye(lk.out.shape[1]), atol=1e-5)
    assert (tmp_path / "a" / "report.png").stat().st_size > 1000
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["counts"]["dof"] == full.lock.dof and rep["rounds"] == full.rounds

    # kill during round 2's fine-tune, then resume: the same lock, bit for bit
    real, calls = sub.finetune_delta, []

    def dying(*a, **k):
        calls.append(a[-1])
        if a[-1].startswith("round 2"):
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sub, "finetune_delta", dying)
    with pytest.raises(KeyboardInterrupt):
        sub.learn_lock(_cfg(root), tmp_path / "b", components=c, dataset=ds)
    monkeypatch.setattr(sub, "finetune_delta", real)
    assert not (tmp_path / "b" / "manifest.json").exists()  # nothing final was written
    with pytest.raises(MaskLearnError, match="not empty"):
        sub.learn_lock(_cfg(root), tmp_path / "b", components=c, dataset=ds)
    with pytest.raises(MaskLearnError, match="other settings"):
        sub.learn_lock(_cfg(root, budget=0.3), tmp_path / "b", components=c, dataset=ds, resume=True)
    resumed = sub.learn_lock(_cfg(root), tmp_path / "b", components=c, dataset=ds, resume=True)
    assert resumed.lock.entries() == full.lock.entries()
    assert resumed.rounds == full.rounds


def test_learn_lock_sign_verify_from_the_command_line(world, tmp_path, capsys):
    root, _, _ = world
    out = tmp_path / "lock"
    rc = cli_main(["learn-lock", "--base", str(root / "base"), "--data", str(root / "data"), "--illegal", "zero",
                   "--innocent", "one", "--out", str(out), "--rounds", "1", "--steps", "2", "--batch-size", "4",
                   "--select", "contrast", "--budget", "0.2", "--set", "num_threads=1", "--set", "progress=false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "locked degrees of freedom" in text and "round 1: captured" in text
    man = Manifest.load(out / "manifest.json")
    assert man.provenance["method"] == "subspace-learned" and man.provenance["config"]["select"] == "contrast"
    assert cli_main(["keygen", "--out", str(tmp_path / "k.key"), "--algorithm", "hmac-sha256"]) == 0
    signed = tmp_path / "signed" / "manifest.json"
    signed.parent.mkdir()
    assert cli_main(["sign", "--manifest", str(out / "manifest.json"), "--key", str(tmp_path / "k.key"),
                     "--out", str(signed)]) == 0
    assert (signed.parent / man.locks["file"]).is_file()  # the bases travel with the signed manifest
    # the base itself passes; without --base a locked manifest cannot be verified
    assert cli_main(["verify", "--manifest", str(signed), "--model", str(root / "base"), "--base",
                     str(root / "base")]) == 0
    assert "no tensor is frozen by this manifest; all" in capsys.readouterr().out
    assert cli_main(["verify", "--manifest", str(signed), "--model", str(root / "base")]) == 2
    assert "pass --base" in capsys.readouterr().err


def test_learn_lock_refuses_unknown_domains(world, tmp_path):
    root, c, ds = world
    with pytest.raises(MaskLearnError, match="unknown domain"):
        sub.learn_lock(_cfg(root, illegal=["seven"]), tmp_path / "x", components=c, dataset=ds)
    with pytest.raises(MaskLearnError, match="needs an innocent"):
        sub.learn_lock(_cfg(root, innocent=[], select="contrast"), tmp_path / "x", components=c, dataset=ds)
