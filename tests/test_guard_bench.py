"""The guard efficacy benchmark's --quick suite runs every stage and writes complete results."""
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench/run.py does the same before dispatching
    from guard import main

    out = tmp_path / "out"
    assert main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    res = json.loads((out / "guard.json").read_text())
    assert res["suite"] == "quick" and res["plan"]["seeds"] == [0, 1]
    assert 0.0 <= res["recogniser"]["accuracy"] <= 1.0 and res["recogniser"]["n_test"] > 0
    settings = [s["name"] for s in res["settings"]]
    assert settings == ["same", "diff"]
    # every run has a full curve of finite numbers, and guarded jobs proved their freeze
    assert len(res["runs"]) > 10
    for r in res["runs"]:
        assert [c["step"] for c in r["curve"]] == sorted(r["job"]["eval_at"])
        for c in r["curve"]:
            assert 0.0 <= c["rate"] <= 1.0 and 0.0 <= c["mean_prob"] <= 1.0 and c["heldout_loss"] > 0
            assert c["n"] == res["plan"]["samples"]
        if r["job"]["mask"] and r["job"]["method"] == "full" and r["job"]["granularity"] == "tensors":
            assert r["info"]["verified"] is True
    # the summary pairs guarded and full runs by seed for both domains
    for name in settings:
        s = res["summary"]["settings"][name]
        rows = {row["condition"]: row for row in s["headline"]}
        assert {"full", "random", "learned"} <= set(rows)
        # every seed pairs on the mean probability (always > 0); on the recognition rate a seed pairs
        # exactly when its full fine-tuning recognised something (else the ratio is undefined, not 0)
        assert rows["learned"]["mitigation_prob"]["n"] == 2 and rows["learned"]["legal_impact_prob"]["n"] == 2
        for metric, role in (("mitigation", "illegal"), ("legal_impact", "legal")):
            dom = s["setting"][role]
            step = res["plan"]["user_steps"]
            ref = {r["job"]["seed"]: next(c["rate"] for c in r["curve"] if c["step"] == step)
                   for r in res["runs"] if r["job"]["condition"] == "full" and r["job"]["domain"] == dom
                   and r["job"]["method"] == "full" and r["job"]["lr"] == res["plan"]["user_lr"]
                   and step in r["job"]["eval_at"]}
            assert sorted(ref) == [0, 1]
            reached = sum(rate > 0 for rate in ref.values())
            assert rows["learned"][metric]["n"] == reached, (name, metric)
        m = rows["learned"]["mitigation"]["values"]
        full = [r for r in res["runs"] if r["job"]["condition"] == "full" and r["job"]["domain"] ==
                s["setting"]["illegal"] and r["job"]["method"] == "full" and r["job"]["lr"] == res["plan"]["user_lr"]]
        assert full and isinstance(m[0], (float, str))
        assert 0.29 <= rows["learned"]["frozen_params"] <= 0.3
        assert any(a["condition"].startswith("LoRA") for a in s["adaptive"])
        # each learned mask says how far its soft mask was from the exported hard one
        conv = s["convergence"]
        assert conv and all(0.0 <= c["agreement"] <= 1.0 and c["spread"] >= 0.0 for c in conv.values())
    md = (out / "guard.md").read_text()
    assert "Setting 'same'" in md and "mitigation" in md and "Did the learned soft masks converge?" in md
    # a smoke run says so and gives no verdict on numbers too small to carry one
    assert "**Smoke run**" in md and "(met)" not in md and "(missed)" not in md and "Targets" not in md
    assert all(s["targets"] == {} for s in res["summary"]["settings"].values())
    for name in settings:
        assert (out / f"curves_{name}.png").stat().st_size > 1000
        assert (out / f"samples_{name}.png").stat().st_size > 500
    # a rerun takes everything from the caches and gives the same numbers
    out2 = tmp_path / "out2"
    assert main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out2), "--workers", "1",
                 "--no-progress"]) == 0
    again = json.loads((out2 / "guard.json").read_text())
    assert again["summary"]["settings"]["same"]["headline"] == res["summary"]["settings"]["same"]["headline"]

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
    monkeypatch.syspath_prepend(str(BENCH))
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
