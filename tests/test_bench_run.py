"""bench/run.py end to end on a tiny model: rows, ratios, conditions, files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_run_writes_side_by_side_rows(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--preset", "tiny", "--resolution", "16",
                        "--steps", "2", "--warmup", "1", "--batch", "8", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "default.json").read_text())
    rows = {row["scenario"]: row for row in data["rows"]}
    assert set(rows) == {"full", "naive@50%", "engine@50%"}
    eng, naive, full = rows["engine@50%"], rows["naive@50%"], rows["full"]
    assert eng["verify_ok"] and naive["verify_ok"]
    # exact ledger: the engine holds no more than naive freezing, which holds less than full
    assert eng["static_mib"] < naive["static_mib"] < full["static_mib"]
    assert eng["activations_mib"] <= naive["activations_mib"]
    assert 0 < eng["static_vs_full"] < 1 and "time_vs_naive" in eng
    cond = data["conditions"]
    for key in ("device", "torch", "preset", "resolution", "batch", "autocast", "commit"):
        assert key in cond
    assert cond["preset"] == "tiny"
    md = (tmp_path / "default.md").read_text()
    assert "| engine@50% |" in md and "Conditions:" in md and "nvml" in md


@pytest.mark.slow
def test_bench_optimizer_suite(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "optimizer", "--optim-numel", "20000",
                        "--steps", "2", "--warmup", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "optimizer.json").read_text())["rows"]
    timed = {(x["provider"], x["trainable"]) for x in rows if "step_ms" in x}
    assert {("flat_engine", 0.5), ("torch_fused", 0.5), ("torch_foreach", 1.0)} <= timed
    flat = next(x for x in rows if x["provider"] == "flat_engine" and x["trainable"] == 0.3)
    assert 0.25 < flat["elements"] / 20000 < 0.35 and flat["gb_per_s"] > 0


@pytest.mark.slow
def test_bench_masklearn_suite(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "masklearn", "--preset", "tiny",
                        "--resolution", "16", "--batch", "8", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "masklearn.json").read_text())
    assert [row["step"].split()[0] for row in data["rows"]] == ["plain", "simulated-user", "mask", "average"]
    assert all(row["ms"] > 0 for row in data["rows"])
    assert data["raw"]["tensors"] == 208


@pytest.mark.slow
def test_bench_lock_suite_counts_the_bases_and_proves_the_locks(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "lock", "--preset", "tiny", "--resolution",
                        "16", "--steps", "2", "--warmup", "1", "--batch", "8", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["scenario"]: row for row in json.loads((tmp_path / "lock.json").read_text())["rows"]}
    plain, out, inp = rows["engine@0%"], rows["engine+lock30%out@0%"], rows["engine+lock30%in@0%"]
    assert plain["locked_dof"] == 0 and plain["lock_bases_mib"] == 0
    for row in (out, inp, rows["engine+lock30%out@30%"]):
        assert row["verify_ok"] and "locked tensors within tolerance" in row["verify"]
        assert row["locked_dof"] > 0 and row["lock_bases_mib"] > 0 and row["lock_transient_mib"] > 0
        # the ledger counts the bases in the static memory, and nothing else changed
        assert row["static_mib"] == pytest.approx(rows["engine@" + row["scenario"].split("@")[1]]["static_mib"]
                                                  + row["lock_bases_mib"], rel=1e-9)
        assert row["static_vs_unlocked"] > 1 and row["time_vs_unlocked"] > 0
    # the same loss at step 0 (the lock changes updates, not the forward pass of the base)
    assert out["losses"][0] == plain["losses"][0]
    assert "lock bases MiB" in (tmp_path / "lock.md").read_text()


@pytest.mark.slow
def test_bench_savings_suite_puts_every_option_side_by_side(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "savings", "--preset", "tiny", "--resolution",
                        "16", "--steps", "1", "--warmup", "1", "--batch", "8", "--no-compile", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["scenario"]: row for row in json.loads((tmp_path / "savings.json").read_text())["rows"]}
    assert "engine+compile@50%" not in rows
    assert all(row["verify_ok"] for name, row in rows.items() if name != "full")
    eng, ib, both = rows["engine@50%"], rows["engine+inbackward@50%"], rows["engine+inbackward+8bit@50%"]
    assert ib["grads_in_backward_mib"] > 0 and ib["static_mib"] < eng["static_mib"]
    assert both["static_mib"] < rows["engine+8bit@50%"]["static_mib"] < eng["static_mib"]
    assert both["peak_vs_full"] < eng["peak_vs_full"] < 1
    assert rows["engine@down"]["prefix"][:3] == ["time_proj", "time_embedding", "conv_in"]
    assert rows["engine-noprefix@down"]["prefix"] == []


def test_results_are_not_written_into_bench_results_from_a_dirty_tree(tmp_path, monkeypatch):
    import common

    monkeypatch.delenv(common.ALLOW_DIRTY, raising=False)
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234+dirty")
    for inside in (common.RESULTS, common.RESULTS / "cpu-small"):
        with pytest.raises(SystemExit, match="uncommitted changes"):
            common.refuse_dirty_results(inside)
    with pytest.raises(SystemExit):  # the writers refuse too, before touching the folder
        common.write_results(common.RESULTS / "_never", "x", {}, "")
    assert not (common.RESULTS / "_never").exists()
    common.refuse_dirty_results(tmp_path)  # anywhere else: fine
    monkeypatch.setenv(common.ALLOW_DIRTY, "1")
    common.refuse_dirty_results(common.RESULTS)  # told so
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234")
    monkeypatch.delenv(common.ALLOW_DIRTY)
    common.refuse_dirty_results(common.RESULTS)  # a clean tree
