"""learn-mask / mask-report subcommands, the report helpers, the baselines and the cost probe."""
import json
import math

import pytest
import torch

from freezeasguard.engine.cli.main import main as cli_main
from freezeasguard.engine.errors import MaskError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask, param_budget, tensor_budget
from freezeasguard.engine.model.components import build_components, load_components, save_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ds = digits_dataset(16)
    c = build_components("tiny", extra_words=caption_words(ds.captions), seed=0)
    return save_components(c, tmp_path_factory.mktemp("m") / "base")


def _run(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _learn(capsys, base, out, *extra):
    return _run(capsys, "learn-mask", "--base", base, "--data", "digits", "--illegal", "seven",
                "--innocent", "one,two:0.5", "--budget", "0.3", "--out", out, "--steps", "3",
                "--bootstrap-steps", "1", "--set", "progress=false", "--set", "mask.every=3", *extra)


def test_learn_mask_then_report_with_png_and_overlap(capsys, caplog, base, tmp_path):
    out = tmp_path / "m.json"
    rc, stdout, err = _learn(capsys, base, out, "--budget-by", "tensors", "--set", "checkpoint_every=3",
                             "--baselines")
    assert rc == 0, err
    assert "learned mask: frozen 62/208 tensors" in stdout and f"manifest written to {out}" in stdout
    unet = load_components(base).unet
    for name in ("", ".random", ".magnitude", ".saliency"):
        man = Manifest.load(tmp_path / f"m{name}.json")
        man.check_model(unet)
        assert man.counts["tensors"]["frozen"] == tensor_budget(0.3, 208)
        assert man.provenance["method"] == (name[1:] or "learned")
    # a few mask steps cannot split the soft mask: said on stdout, warned, recorded in the manifest
    conv = Manifest.load(out).provenance["convergence"]
    assert conv["converged"] is False and 0.0 <= conv["agreement"] < 0.9
    assert "soft mask:" in stdout and "NOT converged" in stdout and "has not converged" in caplog.text
    cfg = json.loads((tmp_path / "m.run" / "config.json").read_text())
    assert cfg["innocent"] == ["one", "two"] and cfg["innocent_weights"] == [1.0, 0.5]

    # --resume continues the same run to more steps
    rc, stdout, err = _learn(capsys, base, out, "--budget-by", "tensors", "--set", "checkpoint_every=3",
                             "--resume", "--steps", "5")
    assert rc == 0, err
    steps = [json.loads(r)["step"] for r in (tmp_path / "m.run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    other = Manifest.build(unet, FreezeMask.random(unet, 0.3, "tensors", seed=3), {"method": "random"})
    other.save(tmp_path / "r.json")
    rc, stdout, err = _run(capsys, "mask-report", out, tmp_path / "r.json", "--png", tmp_path / "r.png")
    assert rc == 0, err
    for text in ("down_blocks.0", "mid_block", "up_blocks.1", "attention", "resnet", "norm",
                 "Jaccard overlap of frozen sets", "made by: learned"):
        assert text in stdout
    from PIL import Image

    assert Image.open(tmp_path / "r.png").format == "PNG"


@pytest.mark.parametrize("argv, message", [
    (("--illegal", "cat"), "unknown domain(s) ['cat'] in digits"),
    (("--budget", "1.5"), "mask.budget must be in [0, 1], got 1.5"),
    (("--innocent", "one:x"), "bad domain weight in 'one:x'"),
    (("--illegal", "seven:2"), "weights apply to innocent domains only"),
    (("--base", "/nonexistent/base"), "does not exist"),
    (("--set", "mask.every=1"), "mask.every must be >= 2"),
])
def test_learn_mask_bad_inputs_are_one_line_errors(capsys, base, tmp_path, argv, message):
    args = {"--base": str(base), "--illegal": "seven", "--innocent": "one", "--budget": "0.3"}
    extra = []
    for k, v in zip(argv[::2], argv[1::2]):
        if k in args:
            args[k] = v
        else:
            extra += [k, v]
    rc, _, err = _run(capsys, "learn-mask", "--data", "digits", "--out", tmp_path / "m.json", "--steps", "1",
                      "--bootstrap-steps", "0", *sum(args.items(), ()), *extra)
    assert rc == 2
    # (loaders may print progress bars before the error line)
    assert any(line.startswith("freezeasguard learn-mask: error: ") for line in err.splitlines())
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


def test_mask_report_on_a_missing_file_is_a_clear_error(capsys, tmp_path):
    rc, _, err = _run(capsys, "mask-report", tmp_path / "none.json")
    assert rc == 2 and "does not exist" in err


# ------------------------------------------------------------------------------------ report
def test_blocks_kinds_and_jaccard():
    from freezeasguard.engine.learn.report import group_counts, jaccard, tensor_block, tensor_kind

    assert tensor_block("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert tensor_block("mid_block.attentions.0.proj_in.bias") == "mid_block"
    assert tensor_block("conv_in.weight") == "conv_in"
    assert tensor_kind("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight") == "attention"
    assert tensor_kind("up_blocks.1.attentions.0.transformer_blocks.0.norm2.bias") == "norm"
    assert tensor_kind("up_blocks.1.attentions.0.norm.weight") == "norm"
    assert tensor_kind("down_blocks.0.resnets.0.time_emb_proj.weight") == "resnet"
    assert tensor_kind("down_blocks.0.downsamplers.0.conv.weight") == "sampler"
    assert tensor_kind("conv_norm_out.weight") == "norm" and tensor_kind("conv_out.bias") == "other"

    sizes = {"a.w": 10, "a.b": 1, "mid_block.w": 100}
    x = FreezeMask.from_names(sizes, ["a.w", "mid_block.w"])
    y = FreezeMask.from_names(sizes, ["a.w", "a.b"])
    j = jaccard(x, y)
    assert j["tensors"] == pytest.approx(1 / 3) and j["params"] == pytest.approx(10 / 111)
    rows = {r.group: r for r in group_counts(x, "block")}
    assert (rows["a"].frozen_tensors, rows["a"].tensors, rows["a"].frozen_params, rows["a"].params) == (1, 2, 10, 11)
    with pytest.raises(MaskError, match="different tensors"):
        jaccard(x, FreezeMask.from_names({"z": 1}, []))


# ------------------------------------------------------------------------------------ baselines
def test_magnitude_scores_rank_relative_change_and_survive_zero_init():
    from freezeasguard.engine.learn.baselines import magnitude_scores

    pre = {"big": torch.full((100,), 10.0), "small": torch.full((10,), 0.1), "zero": torch.zeros(5)}
    ft = {"big": pre["big"] + 0.1, "small": pre["small"] + 0.01, "zero": pre["zero"] + 1e-3}
    s = magnitude_scores(pre, ft)
    # the deltas come from fp32 sums: |delta| carries about ulp(|x|) / |delta| relative error
    assert s["small"] == pytest.approx(0.1, rel=1e-5) and s["big"] == pytest.approx(0.01, rel=2e-5)
    assert math.isfinite(s["zero"]) and s["zero"] > s["small"]  # floor = 1e-3 x global RMS


def test_saliency_finds_the_illegal_only_tensors_of_the_toy():
    from test_learner import ILLEGAL_TENSORS, Toy, ToyTask

    from freezeasguard.engine.config import from_dict
    from freezeasguard.engine.learn.baselines import saliency_scores
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.learner import MaskLearner

    torch.manual_seed(0)
    task = ToyTask()
    cfg = from_dict(MaskLearnConfig, {"illegal": ["ill"], "innocent": ["inn"], "steps": 20, "progress": False,
                                      "chunk": 16, "user": {"lr": 1e-2, "batch_size": 16},
                                      "mask": {"every": 100, "budget": 0.4, "budget_by": "tensors"}})
    learner = MaskLearner(Toy(), task, task.domains(), cfg)
    learner.fit()  # 20 simulated-user steps give theta_d; no mask step
    before = learner.logits.detach().clone()
    scores = saliency_scores(learner, batches=2)
    assert set(sorted(scores, key=scores.get)[-4:]) == ILLEGAL_TENSORS
    assert torch.equal(learner.logits.detach(), before)


def test_baselines_have_the_exact_budget(base):
    from freezeasguard.engine.config import resolve
    from freezeasguard.engine.learn.baselines import baseline_masks
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import build_learner

    cfg = resolve(MaskLearnConfig, overrides=[f"base={base}", "illegal=[seven]", "innocent=[one]", "steps=0",
                                              "bootstrap_steps=2", "progress=false", "user.batch_size=4"],
                  presets={})
    learner = build_learner(cfg)
    total = sum(learner.layout.numels)
    for by in ("tensors", "params"):
        masks = baseline_masks(learner, 0.3, by, saliency_batches=1)
        assert set(masks) == {"random", "magnitude", "saliency"}
        for name, m in masks.items():
            s = m.stats()
            if by == "tensors":
                assert s.frozen_tensors == tensor_budget(0.3, 208), name
            else:
                assert param_budget(0.3, total) - 1000 < s.frozen_params <= param_budget(0.3, total), name
        assert masks["magnitude"] != masks["random"] and masks["saliency"] != masks["magnitude"]


def test_mask_step_cost_reports_all_three_steps(base):
    from step_cost import mask_step_cost

    from freezeasguard.engine.config import resolve
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import build_learner

    cfg = resolve(MaskLearnConfig, overrides=[f"base={base}", "illegal=[seven]", "innocent=[one]",
                                              "bootstrap_steps=0", "progress=false", "user.batch_size=4"],
                  presets={})
    learner = build_learner(cfg)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    r = mask_step_cost(learner, repeats=1, warmup=0)
    for k in ("plain_s", "user_s", "mask_s", "cycle_s", "ratio_user", "ratio_mask", "ratio_cycle"):
        assert r[k] > 0 and math.isfinite(r[k]), k
    assert r["tensors"] == 208 and r["batch"] == 4
    # the plain step ran on a copy; the learner's own user step moved its theta
    assert any(not torch.equal(before[n], p) for n, p in learner.model.named_parameters())


def test_a_finetuned_folder_gives_theta_ft(base, tmp_path):
    from freezeasguard.engine.config import resolve
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import build_learner

    c = load_components(base)
    with torch.no_grad():
        for p in c.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ft = {n: p.detach().clone() for n, p in c.unet.named_parameters()}
    save_components(c, tmp_path / "ft")
    cfg = resolve(MaskLearnConfig, overrides=[f"base={base}", "illegal=[seven]", "innocent=[one]", "steps=0",
                                              f"finetuned={tmp_path / 'ft'}", "bootstrap_steps=50",
                                              "progress=false"], presets={})
    learner = build_learner(cfg)  # the folder replaces the bootstrap (50 steps would take a while)
    got = learner.finetuned_state()
    for n, t in ft.items():
        # theta_ft is kept as theta_pre - theta_d: two fp32 roundings, each <= ulp(|w|) / 2 with
        # |w| <= ~1.1 here (norm weights start at 1), i.e. <= 1.2e-7 together
        torch.testing.assert_close(got[n], t, rtol=0, atol=2.5e-7)
