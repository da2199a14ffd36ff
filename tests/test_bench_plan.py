"""``bench/run.py plan``: the 12B Flux transformer's memory plan on the meta device, and its files;
``bench/run.py plan-step``: the planned step run for real."""
import json
import math

import pytest
from plan import FLUX_PARAMS, FLUX_TENSORS, SETUPS, main, plan_preset
from plan_step import main as step_main

ORDER = [name for name, _, _ in SETUPS]


def test_the_flux_plan_holds_its_invariants():
    res = plan_preset("flux", devices=(1, 2, 4, 8))
    assert (res["params"], res["tensors"]) == (FLUX_PARAMS, FLUX_TENSORS) == (11_901_408_320, 1_160)
    assert abs(res["frozen_fraction"] - 0.5) < 0.01 and res["denoiser"] == "FluxTransformer2DModel"
    one = {r["setup"]: r["static_bytes"] for r in res["rows"]}
    assert list(one) == ORDER
    assert one["engine"] < one["naive"] < one["full"]
    assert one["engine+8bit+in-backward"] < min(one["engine+8bit"], one["engine+in-backward"]) \
        and one["engine+8bit"] < one["engine+bf16"] < one["engine"]
    # full AdamW: 16 B per parameter plus a 4 B step count per tensor
    assert one["full"] == 16 * FLUX_PARAMS + 4 * FLUX_TENSORS
    for setup in ORDER:
        rows = sorted((r for r in res["per_device"] if r["setup"] == setup), key=lambda r: r["devices"])
        totals = [r["total_bytes"] for r in rows]
        assert [r["devices"] for r in rows] == [1, 2, 4, 8]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4  # strictly fewer bytes per device
        assert rows[0]["total_bytes"] == one[setup] and rows[0]["gather_gib"] == rows[0]["reduce_gib"] == 0
        assert all(r["gather_gib"] > 0 and r["reduce_gib"] > 0 for r in rows[1:])  # FSDP2's transients counted
        assert all(r["fits_h200"] or not r["fits_80gb"] for r in rows)
    fsdp = {r["setup"]: r["runs"] for r in res["per_device"] if r["devices"] == 2}
    assert fsdp["full"] == fsdp["naive"] == fsdp["engine"] == fsdp["engine+8bit"] == fsdp["engine+bf16"] == "fsdp"
    assert fsdp["engine+in-backward"] == fsdp["engine+8bit+in-backward"] == "refused"
    assert res["largest_block"].startswith("transformer_blocks.")  # double-stream blocks are the larger


def test_the_plan_command_writes_its_files(tmp_path):
    assert main(["--presets", "flux,sd15", "--devices", "1,8", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [r["preset"] for r in data["results"]] == ["flux", "sd15"]
    cond = data["conditions"]
    for key in ("torch", "diffusers", "mask_seed", "not_counted", "capacities", "computed_on"):
        assert key in cond
    assert "activations" in cond["not_counted"] and "fragmentation" in cond["not_counted"]
    md = (tmp_path / "plan.md").read_text()
    assert "| engine+8bit+in-backward | 8 |" in md and "11,901,408,320" in md and "Conditions:" in md
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_plan_step_runs_the_planned_step_and_matches_the_ledger(tmp_path):
    """``bench/run.py plan-step`` on flux-tiny: each setup's real guarded step holds exactly the bytes
    the plan says (the compact setups less than the plain engine), and the loss is finite."""
    setups = "full,engine,engine+8bit+in-backward"
    assert step_main(["--preset", "flux-tiny", "--resolution", "32", "--setups", setups, "--device", "cpu",
                      "--out", str(tmp_path)]) == 0
    rows = {r["setup"]: r for r in json.loads((tmp_path / "step.json").read_text())["rows"]}
    assert list(rows) == setups.split(",")
    for r in rows.values():
        assert r["plan_equals_ledger"] and r["plan_static_bytes"] == r["ledger_static_bytes"] > 0
        assert r["activation_bytes"] > 0 and all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
    assert rows["full"]["frozen_tensors"] == 0 < rows["engine"]["frozen_tensors"]
    s = {k: r["plan_static_bytes"] for k, r in rows.items()}
    assert s["engine+8bit+in-backward"] < s["engine"] < s["full"]
    assert "plan = ledger" in (tmp_path / "step.md").read_text()


def test_plan_step_refuses_an_unknown_setup(tmp_path, capsys):
    with pytest.raises(SystemExit):
        step_main(["--preset", "flux-tiny", "--setups", "engine+4bit", "--out", str(tmp_path)])
    assert "engine+4bit" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("preset", ["tiny", "sdxl-tiny", "sd3-tiny"])
def test_plan_step_matches_the_ledger_on_every_family(tmp_path, preset):
    """The conditioning plan-step draws fits each family's denoiser, and the plan is its ledger."""
    assert step_main(["--preset", preset, "--resolution", "32", "--setups", "engine+8bit", "--device", "cpu",
                      "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert row["plan_equals_ledger"] and row["frozen_tensors"] > 0 and all(math.isfinite(x) for x in row["losses"])
