"""The mask learner: a toy with a known answer, exact budgets, determinism, manifest, resume, DDP."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from freezeasguard.engine.config import from_dict, resolve
from freezeasguard.engine.errors import ConfigError, MaskLearnError
from freezeasguard.engine.guard.mask import FreezeMask, param_budget, tensor_budget
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.learn.diagnostics import convergence
from freezeasguard.engine.learn.learner import MaskLearner
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the toy
class Toy(nn.Module):
    """Innocent samples go through trunk -> mid -> head_inn; illegal ones only through ill1 -> ill2.

    So ill1/ill2 serve the illegal domain alone: freezing them stops illegal fine-tuning and
    costs the innocent domain nothing. That is the right answer at a budget of their size.
    """

    def __init__(self):
        super().__init__()
        self.trunk, self.mid, self.head_inn = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.ill1, self.ill2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, ill):
        inn = self.head_inn(torch.tanh(self.mid(torch.tanh(self.trunk(x)))))
        return torch.where(ill[:, None], self.ill2(torch.tanh(self.ill1(x))), inn)


ILLEGAL_TENSORS = {"ill1.weight", "ill1.bias", "ill2.weight", "ill2.bias"}


class ToyTask:
    """Regression onto a random teacher of the same shape; 128 illegal and 128 innocent samples."""

    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.ill = torch.arange(n) % 2 == 0
        torch.manual_seed(1)
        with torch.no_grad():
            self.y = Toy()(self.x, self.ill)

    def domains(self):
        return ["ill" if b else "inn" for b in self.ill.tolist()]

    def draw(self, gen, n):
        return (0.01 * torch.randn(n, 8, generator=gen),)

    def losses(self, model, idx, draws):
        return (model(self.x[idx] + draws[0], self.ill[idx]) - self.y[idx]).square().mean(1)


def _toy_finetune(task, pre, frozen, steps=150):
    """A user's guarded fine-tuning: AdamW on the trainable tensors, full batch, both domains."""
    m = Toy()
    m.load_state_dict(pre)
    for n, p in m.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = (m(task.x, task.ill) - task.y).square().mean(1)
        opt.zero_grad()
        (loss[task.ill].mean() + loss[~task.ill].mean()).backward()
        opt.step()
    with torch.no_grad():
        loss = (m(task.x, task.ill) - task.y).square().mean(1)
    return float(loss[task.ill].mean()), float(loss[~task.ill].mean())


@pytest.mark.parametrize("by", ["tensors", "params"])
def test_toy_learned_mask_freezes_the_illegal_only_tensors_and_beats_random(by):
    torch.manual_seed(0)
    model, task = Toy(), ToyTask()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = {n: p.numel() for n, p in pre.items()}
    budget = 4 / 10 if by == "tensors" else sum(sizes[n] for n in ILLEGAL_TENSORS) / sum(sizes.values())
    cfg = from_dict(MaskLearnConfig, {
        "illegal": ["ill"], "innocent": ["inn"], "steps": 50, "progress": False, "chunk": 16,
        "user": {"lr": 1e-2, "batch_size": 16}, "mask": {"budget": budget, "budget_by": by}})
    learner = MaskLearner(model, task, task.domains(), cfg)
    learner.fit()
    mask = learner.export_mask()
    assert mask.frozen_set == ILLEGAL_TENSORS
    scores = learner.scores()
    assert min(scores[n] for n in ILLEGAL_TENSORS) > max(v for n, v in scores.items() if n not in ILLEGAL_TENSORS)

    ill_none, inn_none = _toy_finetune(task, pre, set())
    ill_learned, inn_learned = _toy_finetune(task, pre, mask.frozen_set)
    randoms = [_toy_finetune(task, pre, FreezeMask.random(pre, budget, by, seed=s).frozen_set) for s in range(4)]
    assert ill_learned > 10 * ill_none
    # Mitigates illegal fine-tuning at least as well as every random mask (one may draw the same
    # set) and better on average.
    assert ill_learned >= max(r[0] for r in randoms)
    assert ill_learned > 2 * sum(r[0] for r in randoms) / len(randoms)
    assert inn_learned == pytest.approx(inn_none, rel=1e-6)  # and leaves the innocent domain alone


def test_convergence_reports_how_far_the_soft_mask_is_from_the_export():
    torch.manual_seed(0)
    model, task = Toy(), ToyTask()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    budget = sum(sizes[n] for n in ILLEGAL_TENSORS) / sum(sizes.values())
    cfg = from_dict(MaskLearnConfig, {"illegal": ["ill"], "innocent": ["inn"], "steps": 0, "progress": False,
                                      "chunk": 16, "user": {"lr": 1e-2, "batch_size": 16},
                                      "mask": {"budget": budget, "budget_by": "params", "temperature": 0.2}})
    learner = MaskLearner(model, task, task.domains(), cfg)
    # at the start every m = rho < 1/2: nothing of the export is hard, the logits are all equal
    c = convergence(learner)
    assert c["agreement"] == 0.0 and c["decisive"] == 0.0 and not c["converged"]
    assert c["spread"] == 0.0 and c["margin"] == 0.0
    # a split soft mask: the four illegal tensors at +1, the rest at -1 (5 T either side)
    idx = learner.layout.index()
    with torch.no_grad():
        for n in sizes:
            learner.logits[idx[n]] = 1.0 if n in ILLEGAL_TENSORS else -1.0
    mask = learner.export_mask()
    assert mask.frozen_set == ILLEGAL_TENSORS
    c = convergence(learner, mask)
    assert c["agreement"] == 1.0 and c["decisive"] == 1.0 and c["converged"]
    assert c["margin"] == pytest.approx(10.0) and c["spread"] == pytest.approx(10.0)
    # half of the frozen parameters soft-unfrozen: agreement counts parameters, not tensors
    with torch.no_grad():
        learner.logits[idx["ill1.weight"]] = -0.5
    c = convergence(learner, mask)
    assert c["agreement"] == pytest.approx((280 - 128) / 280) and not c["converged"]
    # logits just above their start at a budget of 1/2: the right tensors, but not a converged mask
    with torch.no_grad():
        for n in sizes:
            learner.logits[idx[n]] = 0.01 if n in ILLEGAL_TENSORS else -0.01
    c = convergence(learner, mask)
    assert c["agreement"] == 1.0 and c["decisive"] == 0.0 and not c["converged"]
    json.dumps(c, allow_nan=False)  # goes into manifests as strict JSON
    # diverged logits (a large SGD lr) are reported, not an overflow
    with torch.no_grad():
        learner.logits[idx["trunk.weight"]] = -2e5
        learner.logits[idx["ill1.weight"]] = 3e4
    c = convergence(learner, mask)
    assert c["spread"] == pytest.approx(2.3e5 / 0.2) and 0.0 <= c["decisive"] <= 1.0


# ------------------------------------------------------------------------------------ the UNet
@pytest.fixture(scope="module")
def tiny():
    ds = digits_dataset(16, classes=(1, 2, 7))
    return build_components("tiny", extra_words=caption_words(ds.captions), seed=0), ds


def _cfg(work_dir, *overrides):
    base = ["illegal=[seven]", "innocent=[one,two]", "steps=6", "bootstrap_steps=0", "user.batch_size=8",
            "user.lr=1e-3", "num_threads=1", "progress=false", "mask.every=3", "mask.lr=0.1", "device=cpu",
            f"work_dir={work_dir}" if work_dir else "work_dir=null"]
    return resolve(MaskLearnConfig, overrides=[*base, *overrides], presets={})


def _learner(tiny, cfg, resume=False):
    from freezeasguard.engine.learn.pipeline import build_learner

    c, ds = tiny
    return build_learner(cfg, components=dataclasses.replace(c, unet=_copy(c.unet)), dataset=ds, resume=resume)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_per_sample_loss_averages_to_the_training_loss(tiny):
    from freezeasguard.engine.model.diffusion import diffusion_loss, per_sample_diffusion_loss

    c, _ = tiny
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    cond, t = torch.randn(4, 77, 32, generator=g), torch.randint(0, 1000, (4,), generator=g)
    with torch.no_grad():
        per = per_sample_diffusion_loss(c.unet, c.schedule, x0, cond, noise, t)
        ref = diffusion_loss(c.unet, c.schedule, x0, cond, noise, t)
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), ref, rtol=1e-6, atol=0)


def test_exact_budgets_and_determinism_by_seed(tiny):
    a = _learner(tiny, _cfg(None, "steps=4"))
    a.fit()
    names = a.layout.model_names
    total = sum(a.layout.numels)
    for rho in (0.0, 0.13, 0.3, 0.5, 1.0):
        by_t = a.export_mask(rho, "tensors").stats()
        assert by_t.frozen_tensors == tensor_budget(rho, len(names))
        by_p = a.export_mask(rho, "params").stats()
        assert by_p.frozen_params <= param_budget(rho, total)
        assert by_p.param_ratio > rho - 0.01  # the greedy fill ends within a small tensor
    b = _learner(tiny, _cfg(None, "steps=4"))
    b.fit()
    assert torch.equal(a.logits, b.logits) and a.export_mask() == b.export_mask()
    c = _learner(tiny, _cfg(None, "steps=4", "seed=1"))
    c.fit()
    assert not torch.equal(a.logits, c.logits)
    row = a.history[-1]
    assert {"L_illegal", "L_innocent", "mean_m", "hard_tensors", "hard_params", "kind"} <= set(row)
    assert [r["kind"] for r in a.history] == ["user", "user", "mask", "user"]


def test_flat_buffers_stay_consistent(tiny):
    learner = _learner(tiny, _cfg(None, "steps=5"))
    learner.fit()
    # theta(m) = theta_pre - (1 - m) theta_d, and the model's weights are theta itself.
    m = learner.soft_mask()
    keep = (1 - m)[learner.row_group]
    expect = learner.theta_pre.view(-1, learner.layout.chunk) - keep[:, None] * learner.theta_d.view(-1, learner.layout.chunk)
    torch.testing.assert_close(learner.theta, expect.view(-1), rtol=0, atol=1e-6)
    p = dict(learner.model.named_parameters())["conv_in.weight"]
    assert p.data_ptr() == learner.layout.views(learner.theta)["conv_in.weight"].data_ptr()
    assert learner.user_steps == 4 and learner.step == 5


def test_learn_mask_writes_a_manifest_that_verifies_against_the_base(tiny, tmp_path):
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.learn.pipeline import learn_mask
    from freezeasguard.engine.model.components import load_components, save_components

    c, ds = tiny
    base = save_components(c, tmp_path / "base")
    cfg = _cfg(tmp_path / "work", f"base={base}", "bootstrap_steps=2", "steps=3", "mask.budget=0.25",
               "mask.budget_by=tensors")
    res = learn_mask(cfg, tmp_path / "mask.json", dataset=ds)
    man = Manifest.load(tmp_path / "mask.json")
    unet = load_components(base).unet
    man.check_model(unet)  # names, shapes, dtypes and fingerprint of the base folder
    assert man.mask(unet) == res.mask
    assert man.counts["tensors"]["frozen"] == tensor_budget(0.25, 208)
    prov = man.provenance
    assert prov["method"] == "learned" and prov["seed"] == 0
    assert prov["config"]["mask"]["budget"] == 0.25 and prov["loss_summary"]["steps"] == 3
    assert (tmp_path / "work" / "finetuned" / "unet").is_dir()  # the bootstrap model is kept
    assert len((tmp_path / "work" / "log.jsonl").read_text().splitlines()) == 3
    assert res.learner.theta_d.abs().sum() > 0


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tiny, tmp_path):
    ref = _learner(tiny, _cfg(tmp_path / "a", "steps=8", "bootstrap_steps=2"))
    ref.fit()
    part = _learner(tiny, _cfg(tmp_path / "b", "steps=8", "bootstrap_steps=2", "checkpoint_every=3"))
    part.fit(5)  # checkpoint at step 3; the "kill" loses steps 4-5
    del part
    resumed = _learner(tiny, _cfg(tmp_path / "b", "steps=8", "bootstrap_steps=2", "checkpoint_every=3",
                                  "keep_checkpoints=1"), resume=True)
    assert resumed.step == 3
    resumed.fit()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000006"]
    assert torch.equal(ref.logits, resumed.logits)
    for k in ("theta", "theta_d", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(ref, k), getattr(resumed, k)), k
    assert ref.export_mask() == resumed.export_mask()
    steps = [json.loads(r)["step"] for r in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # rows after the checkpoint were not duplicated
    def losses(h):
        return [(r["step"], r["L_illegal"], r["L_innocent"], r["mean_m"]) for r in h]

    assert losses(resumed.history) == losses(ref.history)
    other = _learner(tiny, _cfg(tmp_path / "b", "steps=8", "bootstrap_steps=2", "mask.lr=0.2"))
    with pytest.raises(MaskLearnError, match=r"another config: \['mask.lr'\]"):
        other.resume()


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(MaskLearnError, match=r"unknown domain\(s\) \['eight'\].*\['one', 'seven', 'two'\]"):
        _learner(tiny, _cfg(None, "illegal=[eight]"))
    with pytest.raises(ConfigError, match=r"mask.budget must be in \[0, 1\], got 1.5"):
        _cfg(None, "mask.budget=1.5")
    with pytest.raises(ConfigError, match=r"both illegal and innocent"):
        _cfg(None, "innocent=[seven]")
    with pytest.raises(ConfigError, match="unknown config key 'mask.lrr'"):
        _cfg(None, "mask.lrr=1")
    with pytest.raises(ConfigError, match="user.max_grad_norm"):
        _cfg(None, "user.max_grad_norm=0")


def test_a_non_finite_user_gradient_stops_before_any_buffer_changes(tiny):
    learner = _learner(tiny, _cfg(None))
    p = next(iter(learner.model.parameters()))
    p.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {k: getattr(learner, k).clone() for k in ("theta", "theta_d", "exp_avg", "exp_avg_sq")}
    with pytest.raises(MaskLearnError, match="gradient norm is (inf|nan) at step 0; nothing was updated"):
        learner.train_step()  # step 0 is a simulated-user step (mask.every=3)
    assert all(torch.equal(getattr(learner, k), v) for k, v in before.items()) and learner.user_steps == 0


# ------------------------------------------------------------------------------ decision groups
def _first_row_and_rest(layout, device="cpu"):
    """Two units per tensor that spans more than one row of the flat view: its first row, the rest."""
    from freezeasguard.engine.learn.groups import MaskGroups

    rows, numels, owner = [], [], []
    for i, (r, k) in enumerate(zip(layout.rows_per_tensor().tolist(), layout.numels)):
        head = min(k, layout.chunk)
        parts = [(1, head), (r - 1, k - head)] if r > 1 else [(r, k)]
        for pr, pk in parts:
            rows.append(pr)
            numels.append(pk)
            owner.append(i)
    return MaskGroups(torch.tensor(rows, device=device), torch.tensor(numels, dtype=torch.float64, device=device),
                      tuple(owner))


def test_a_learner_decides_on_the_groups_it_is_given():
    torch.manual_seed(0)
    task = ToyTask()
    cfg = from_dict(MaskLearnConfig, {"illegal": ["ill"], "innocent": ["inn"], "steps": 5, "progress": False,
                                      "chunk": 16, "user": {"lr": 1e-2, "batch_size": 8},
                                      "mask": {"every": 2, "lr": 0.5, "budget": 0.3}})
    learner = MaskLearner(Toy(), task, task.domains(), cfg, groups=_first_row_and_rest)
    lay, groups = learner.layout, learner.groups
    assert learner.logits.shape == (len(groups),) and len(groups) > len(lay)
    learner.fit()
    m = learner.soft_mask()
    assert len(set(m.tolist())) > len(lay) // 2  # the units of one tensor moved apart
    # theta(m) = theta_pre - (1 - m_unit) theta_d, one keep factor per unit's rows
    keep = torch.repeat_interleave(1 - m, groups.rows)
    view = (-1, lay.chunk)
    expect = learner.theta_pre.view(view) - keep[:, None] * learner.theta_d.view(view)
    torch.testing.assert_close(learner.theta, expect.view(-1), rtol=0, atol=1e-6)
    # the mask gradient is one dot product per unit, against a float64 loop over its rows
    learner.backward(6, publisher=True)
    dots = learner.reduced_dots()
    prod = (learner.theta_d.double() * learner.grad.double()).view(view).sum(1)
    ref = torch.stack([part.sum() for part in prod.split(groups.rows.tolist())])
    torch.testing.assert_close(dots, ref, rtol=1e-5, atol=1e-9)
    # the budget counts each unit's own parameters
    assert float(learner.mask_stats()["mean_m"]) == pytest.approx(float((m.double() * groups.numels).sum()
                                                                        / groups.numels.sum()), rel=1e-6)
    assert learner.all_reduce(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]  # one process: the sum is itself
