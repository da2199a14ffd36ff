"""The guard efficacy benchmark's --quick suite runs every stage and writes complete results."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _rate(run, step):
    return next(c["rate"] for c in run["curve"] if c["step"] == step)


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, monkeypatch):
    from efficacy import mitigation
    from guard import main
    from guard_caps import guards
    from guard_plan import QUICK

    out = tmp_path / "out"
    assert main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    res = json.loads((out / "guard.json").read_text())
    assert res["suite"] == "quick" and res["plan"]["seeds"] == [0, 1] and res["plan"]["kind"] == "caps"
    assert 0.0 <= res["recogniser"]["accuracy"] <= 1.0 and res["recogniser"]["n_test"] > 0
    settings = [s["name"] for s in res["settings"]]
    assert settings == ["same", "diff"]
    # every run has a full curve of finite numbers, and every guarded job proved its guard (locks included)
    assert len(res["runs"]) > 40
    for r in res["runs"]:
        assert [c["step"] for c in r["curve"]] == sorted(r["job"]["eval_at"])
        for c in r["curve"]:
            assert 0.0 <= c["rate"] <= 1.0 and 0.0 <= c["mean_prob"] <= 1.0 and c["heldout_loss"] > 0
            assert c["n"] == res["plan"]["samples"]
        if r["job"]["mask"] and (r["job"]["method"] == "full" or "directions" in r["job"]["granularity"]):
            assert r["info"]["verified"] is True, r["job"]
        if "directions" in r["job"]["granularity"]:
            assert "locked tensors within tolerance" in r["info"]["verify"]
    labels = [g[0] for g in guards(QUICK)]
    assert {"mask", "lock 30%", "mask + lock 30%", "lock 30% one-shot", "random subspace 30%"} == set(labels)
    for name in settings:
        s = res["summary"]["settings"][name]
        rows = {row["condition"]: row for row in s["rows"]}
        assert set(rows) == {"full", *labels}
        assert 0.29 <= rows["mask"]["frozen_params"] <= 0.3 and rows["mask"]["locked_matrix_share"] == 0
        assert 0.25 <= rows["lock 30%"]["locked_matrix_share"] <= 0.31 and rows["lock 30%"]["frozen_params"] == 0
        assert 0.29 <= rows["mask + lock 30%"]["frozen_params"] <= 0.3
        assert 0 < rows["mask + lock 30%"]["locked_matrix_share"] < rows["lock 30%"]["locked_matrix_share"]
        # mitigation at the caps, recomputed from the runs: the best admitted user with and without the guard
        st = s["setting"]
        cap, u = res["plan"]["user_lr"], res["plan"]["user_steps"]
        users = [(cap, "full"), (cap * res["plan"]["lr_fraction"], "full"), (cap, "lora")]
        want = []
        for seed in (0, 1):
            def best(cond):
                return max(_rate(r, u) for r in res["runs"] if r["job"]["condition"] == cond
                           and r["job"]["domain"] == st["illegal"] and r["job"]["seed"] == seed
                           and (r["job"]["lr"], r["job"]["method"]) in users
                           and (cond == "full" or r["job"]["setting"] == name))
            m = mitigation(best("lock 30%"), best("full"))
            if m == m:  # nan when no admitted unguarded user recognised anything: no pair
                want.append(m)
        got = rows["lock 30%"]["mitigation_at_caps"]
        assert got["n"] == len(want)
        assert [round(v, 9) for v in got["values"]] == [round(v, 9) for v in want]
        # the lock learner's rounds are reported
        assert s["rounds"] and all(len(v) in (1, 2) for v in s["rounds"].values())
    md = (out / "guard.md").read_text()
    assert "Setting 'same'" in md and "mitigation at caps" in md and "Lock learning" in md
    # a smoke run says so and gives no verdict on numbers too small to carry one
    assert "**Smoke run**" in md and " met" not in md and "missed" not in md and "Targets" not in md
    for name in settings:
        assert (out / f"curves_{name}.png").stat().st_size > 1000
        assert (out / f"samples_{name}.png").stat().st_size > 500
    # a rerun takes everything from the caches and gives the same numbers
    out2 = tmp_path / "out2"
    assert main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out2), "--workers", "1",
                 "--no-progress"]) == 0
    again = json.loads((out2 / "guard.json").read_text())
    assert again["summary"]["settings"]["same"]["rows"] == res["summary"]["settings"]["same"]["rows"]

    # the logit-optimizer diagnostic runs on the suite's base
    from guard_optim import main as optim_main

    out3 = tmp_path / "optim"
    assert optim_main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out3), "--workers", "1"]) == 0
    rows = json.loads((out3 / "mask_optimizers.json").read_text())["rows"]
    assert {(r["setting"], r["steps"]) for r in rows} == {("same", 20), ("diff", 20)}
    for r in rows:
        assert 0.0 <= r["mean_m"] <= 1.0 and r["logits"]["min"] <= r["logits"]["median"] <= r["logits"]["max"]
        assert r["variant"]["bootstrap_steps"] == 0 and 0.0 <= r["convergence"]["decisive"] <= 1.0
    assert "SGD lr 1" in (out3 / "mask_optimizers.md").read_text()
    with pytest.raises(SystemExit, match="no base model"):
        optim_main(["--quick", "--work", str(tmp_path / "nothing"), "--out", str(out3)])


def test_world_from_an_image_folder_keeps_targets_out_of_pretraining(tmp_path, monkeypatch):
    from guard_setup import build_world

    from freezeasguard.engine.model.data import digits_dataset, write_image_folder

    write_image_folder(digits_dataset(16, classes=(0, 1, 5, 6, 8)), tmp_path / "data")
    w = build_world(folder=str(tmp_path / "data"), folder_domains=("five", "six", "eight"))
    assert [s.name for s in w.settings] == ["folder"]
    assert set(w.pretrain.domain_names()) == {"zero", "one", "six"}  # neither illegal nor legal
    pub, tr, ho = (len(w.publisher["five"]), len(w.user_train["five"]), len(w.user_heldout["five"]))
    assert pub + tr + ho == 182 and pub == 91  # 50/35/15, disjoint
    assert not {r.file_name for r in w.publisher["five"].records} & {r.file_name for r in w.user_train["five"].records}
    assert "eight" not in w.publisher and len(w.user_train["eight"]) + len(w.user_heldout["eight"]) == 174
    assert w.prompts["five"] == "a photo of the digit five"


def test_the_tensor_mask_study_keeps_its_plan(monkeypatch):
    from guard_plan import PLANS, jobs, mask_specs
    from guard_setup import Setting

    plan = PLANS["tensors"]
    assert plan.kind == "tensors" and plan.budgets == (0.1, 0.3, 0.5)
    specs = mask_specs(plan)
    assert any(sp.by == "tensors" for _, sp, _ in specs) and {"magnitude", "saliency"} <= {lb for lb, _, _ in specs}
    st = [Setting("same", "five", "six", "eight", "same kind"), Setting("diff", "five", "background", "face",
                                                                       "different kind")]
    js = jobs(plan, st, lambda s, sp: f"{s.name}/{sp.name}")
    assert len(js) > 100 and {j.method for j in js} == {"full", "lora"}
