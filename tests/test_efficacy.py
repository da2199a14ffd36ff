"""Efficacy harness: recogniser, metrics, row masks and their learner, masked updates, simulated users."""
import dataclasses
import math

import pytest
import torch
from efficacy import (
    Stat,
    heldout_loss,
    load_recogniser,
    mitigation,
    recognise,
    save_recogniser,
    steps_to_reach,
    stratified_split,
    train_recogniser,
)
from rowmask import RowMask, groups_of

from freezeasguard.engine.errors import MaskError
from freezeasguard.engine.guard.mask import FreezeMask, param_budget
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(16, classes=(1, 2, 7))


@pytest.fixture(scope="module")
def tiny(digits):
    return build_components("tiny", extra_words=caption_words(digits.captions), seed=0)


# ------------------------------------------------------------------------------------ splits, stats
def test_stratified_split_partitions_each_domain_by_its_fractions():
    domains = ["a"] * 10 + ["b"] * 20 + [None]
    parts = stratified_split(domains, [0.5, 0.3, 0.2], seed=3)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(30))  # disjoint, complete, unlabelled left out
    assert [sum(domains[i] == "a" for i in p) for p in parts] == [5, 3, 2]
    assert [sum(domains[i] == "b" for i in p) for p in parts] == [10, 6, 4]
    assert stratified_split(domains, [0.5, 0.3, 0.2], seed=3) == parts
    assert stratified_split(domains, [0.5, 0.3, 0.2], seed=4) != parts


def test_metrics():
    assert mitigation(0.3, 0.6) == pytest.approx(0.5)
    assert math.isnan(mitigation(0.3, 0.0))
    s = Stat.of([1.0, 2.0, 3.0, float("nan")])
    assert (s.mean, s.n) == (2.0, 3) and s.std == pytest.approx(1.0)
    assert steps_to_reach([(10, 0.2), (20, 0.6), (40, 0.9)], 0.5) == pytest.approx(17.5)
    assert steps_to_reach([(10, 0.6)], 0.5) == 10.0
    assert steps_to_reach([(10, 0.1), (20, 0.4)], 0.5) is None


# ------------------------------------------------------------------------------------ recogniser
def test_recogniser_learns_real_digits_and_round_trips(digits, tmp_path):
    model, rep = train_recogniser(digits, epochs=6, seed=0)
    assert rep.classes == ["one", "seven", "two"]
    assert rep.n_test + rep.n_train == len(digits) and rep.n_test > 90
    assert rep.accuracy > 0.9, rep
    again, rep2 = load_recogniser(save_recogniser(model, rep, tmp_path / "rec"))
    assert rep2 == rep
    x = digits.images[:50]
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # recognise() against a direct computation of argmax and softmax
    out = recognise(model, rep.classes, x, "seven")
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    assert out["rate"] == pytest.approx(float((p.argmax(1) == 1).float().mean()))
    assert out["mean_prob"] == pytest.approx(float(p[:, 1].mean()), rel=1e-6)
    assert sum(out["predicted"].values()) == 50
    with pytest.raises(Exception, match="not a recogniser class"):
        recognise(model, rep.classes, x, "five")


def test_heldout_loss_is_the_mean_per_sample_loss_on_fixed_draws(tiny, digits):
    from freezeasguard.engine.model.diffusion import per_sample_diffusion_loss
    from freezeasguard.engine.model.encode import encode_dataset

    data = encode_dataset(tiny, digits.subset(range(12)))
    a = heldout_loss(tiny.unet, tiny.schedule, data, draws=2, seed=5, batch_size=5)
    # batching changes only the float summation order
    assert a == pytest.approx(heldout_loss(tiny.unet, tiny.schedule, data, draws=2, seed=5, batch_size=12), rel=1e-6)
    assert a != heldout_loss(tiny.unet, tiny.schedule, data, draws=2, seed=6)
    g = torch.Generator().manual_seed(5)
    ref = []
    with torch.no_grad():
        for _ in range(2):
            noise = torch.randn((12, *data.sample_shape), generator=g)
            t = tiny.schedule.sample_timesteps(12, generator=g)
            torch.randn((12, *data.sample_shape), generator=g)  # the (unused) posterior draw
            x0, cond = data.batch(torch.arange(12), None, None, "cpu")
            ref.append(per_sample_diffusion_loss(tiny.unet, tiny.schedule, x0, cond, noise, t))
    assert a == pytest.approx(float(torch.cat(ref).double().mean()), rel=1e-5)


# ------------------------------------------------------------------------------------ row masks
SHAPES = {"w": (4, 3), "b": (4,), "conv": (2, 3, 3, 3), "n": (5,)}


def test_row_mask_budgets_are_exact_and_greedy():
    scores = {"w": torch.tensor([4.0, 0.0, 3.0, 0.0]), "b": torch.tensor([10.0]),
              "conv": torch.tensor([5.0, -1.0]), "n": torch.tensor([-5.0])}
    total = 12 + 4 + 54 + 5
    # room floor(0.3 * 75) = 22: b (4), conv row 0 (27) does not fit, w rows 0, 2, 1, 3 (3 each),
    # conv row 1 does not fit, n (5) does: 21 parameters.
    m = RowMask.from_scores(SHAPES, scores, 0.3, "params")
    assert param_budget(0.3, total) == 22 and m.stats()["params"]["frozen"] == 21
    assert m.rows["b"].tolist() == [True] and m.rows["conv"].tolist() == [False, False]
    assert m.rows["w"].tolist() == [True, True, True, True] and m.rows["n"].tolist() == [True]
    g = RowMask.from_scores(SHAPES, scores, 0.5, "groups")  # 8 groups -> 4 highest
    assert sum(int(r.sum()) for r in g.rows.values()) == 4
    assert g.rows["b"].item() and g.rows["conv"][0] and g.rows["w"][0] and g.rows["w"][2]
    with pytest.raises(MaskError, match="2 scores for 4 groups"):
        RowMask.from_scores(SHAPES, {**scores, "w": torch.zeros(2)}, 0.3)


def test_row_mask_views_round_trip_and_random(tmp_path):
    m = RowMask.random(SHAPES, 0.4, "params", seed=1)
    assert m.stats()["params"]["frozen"] <= param_budget(0.4, 75)
    assert RowMask.random(SHAPES, 0.4, "params", seed=1).rows.keys() == m.rows.keys()
    back = RowMask.load(m.save(tmp_path / "rows.json"))
    assert all(torch.equal(back.rows[n], m.rows[n]) for n in SHAPES)
    em = m.element_mask("conv")
    assert em.shape == SHAPES["conv"] and bool((em[0] == m.rows["conv"][0]).all())
    whole = FreezeMask.from_names({n: s for n, s in SHAPES.items()}, ["w", "n"])
    rm = RowMask.from_tensor_mask(whole, SHAPES)
    assert rm.tensor_mask() == whole and rm.touched(list(SHAPES)) == ["w", "n"]
    assert groups_of((7, 2, 3)) == 7 and groups_of((7,)) == 1


def test_row_learner_dots_and_theta_match_a_per_row_reference(tiny, digits):
    import copy

    from rowmask import RowMaskLearner

    from freezeasguard.engine.config import from_dict
    from freezeasguard.engine.learn.config import MaskLearnConfig
    from freezeasguard.engine.learn.pipeline import DiffusionTask
    from freezeasguard.engine.model.encode import encode_dataset

    cfg = from_dict(MaskLearnConfig, {"illegal": ["seven"], "innocent": ["one", "two"], "steps": 6, "chunk": 1,
                                      "progress": False, "device": "cpu", "user": {"lr": 1e-3, "batch_size": 8},
                                      "mask": {"every": 3, "lr": 0.1, "budget": 0.3}})
    unet = copy.deepcopy(tiny.unet)
    task = DiffusionTask(encode_dataset(tiny, digits), tiny.schedule, torch.device("cpu"))
    learner = RowMaskLearner(unet, task, digits.domains, cfg)
    learner.fit()
    lay = learner.layout
    assert learner.logits.numel() == sum(groups_of(s) for s in lay.shapes)
    # theta = theta_pre - (1 - m_group) * theta_d, elementwise
    keep = (1 - learner.soft_mask())[learner.row_group]
    torch.testing.assert_close(learner.theta, learner.theta_pre - keep * learner.theta_d, rtol=0, atol=1e-6)
    # per-row dots against a loop over the tensors' rows
    learner.backward(7, publisher=True)
    dots = learner.reduced_dots()
    d_views, g_views = lay.views(learner.theta_d), lay.views(learner.grad)
    ref = []
    for n, s in zip(lay.names, lay.shapes):
        d, g = d_views[n].double(), g_views[n].double()
        ref += (d * g).reshape(groups_of(s), -1).sum(1).tolist()
    torch.testing.assert_close(dots, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    rows = learner.export_rows(0.3, "params")
    assert rows.stats()["params"]["frozen"] <= param_budget(0.3, sum(lay.numels))
    assert rows.stats()["params"]["ratio"] > 0.29


# ------------------------------------------------------------------------------------ masked updates
def test_masked_adamw_equals_adamw_on_free_entries_and_keeps_frozen_ones_bit_exact():
    from simusers import MaskedAdamW

    from freezeasguard.engine.optim.groups import param_groups

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    ref = copy_module(lin)
    mask = RowMask.from_scores(dict((n, tuple(p.shape)) for n, p in lin.named_parameters()),
                               {"weight": torch.tensor([1.0, 0, 1, 0, 0]), "bias": torch.tensor([0.0])}, 0.4, "params")
    named = list(lin.named_parameters())
    frozen = {n: mask.element_mask(n) for n, _ in named}
    base = {n: p.detach().clone() for n, p in named}
    opt = MaskedAdamW(named, frozen, param_groups(named, 0.1), lr=0.05)
    ref_opt = torch.optim.AdamW(param_groups(list(ref.named_parameters()), 0.1), lr=0.05)
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for m, o in ((lin, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
        # the reference sees the same masked gradient through a hook-free path
        ref.weight.grad[frozen["weight"]] = 0
        assert torch.equal(lin.weight.grad, ref.weight.grad)
        opt.step()
        ref_opt.step()
    fw = frozen["weight"]
    assert torch.equal(lin.weight.detach()[fw], base["weight"][fw])  # frozen rows untouched
    assert torch.equal(lin.weight.detach()[~fw], ref.weight.detach()[~fw])  # free rows: AdamW exactly
    assert not torch.equal(lin.weight.detach()[~fw], base["weight"][~fw])


def copy_module(m):
    import copy

    return copy.deepcopy(m)


# ------------------------------------------------------------------------------------ users
@pytest.mark.parametrize("kind", ["full", "tensors", "rows", "lora"])
def test_user_trainer_enforces_each_guard(tiny, digits, tmp_path, kind):
    from simusers import UserBudget, lora_modules, user_trainer

    unet = tiny.unet
    guard = None
    if kind == "tensors":
        guard = FreezeMask.random(unet, 0.3, "params", seed=0)
    elif kind == "rows":
        guard = RowMask.random(unet, 0.3, "params", seed=0)
    elif kind == "lora":  # rows of resnet convs and of every attn2.to_k: the other projections stay open
        scores = {n: torch.full((groups_of(p.shape),), 2.0 * ("attn2.to_k" in n) + ("conv" in n)) + 0.01 * torch.arange(
            groups_of(p.shape)) for n, p in unet.named_parameters()}
        guard = RowMask.from_scores(unet, scores, 0.2, "params")
        assert guard.stats()["tensors"]["partial"] > 0
    trainer, info = user_trainer(tiny, digits.subset(range(64)), guard, UserBudget(2, 1e-3, 8, 0), tmp_path,
                                 method="lora" if kind == "lora" else "full")
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer.fit(2)
    after = dict(trainer.c.unet.named_parameters())
    assert all(torch.equal(before[n], p.detach()) for n, p in unet.named_parameters())  # base untouched
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n].detach())}
    if kind == "full":
        assert len(changed) > 100
    elif kind == "tensors":
        assert trainer.verify_frozen().ok and not (changed & guard.frozen_set)
        assert info["trainable_params"] == guard.stats().trainable_params
    elif kind == "rows":
        for n in before:
            fm = guard.element_mask(n)
            assert torch.equal(after[n].detach()[fm], before[n][fm]), n
        assert any(not torch.equal(after[n].detach()[~guard.element_mask(n)], before[n][~guard.element_mask(n)])
                   for n in before if guard.rows[n].any() and not guard.rows[n].all())
    else:  # LoRA: base tensors fixed, adapters only on modules without a frozen row
        assert not changed
        mods = lora_modules(unet, guard)
        touched = set(guard.touched([n for n, _ in unet.named_parameters()]))
        assert mods and all(not any(t.startswith(m + ".") for t in touched) for m in mods)
        assert not any(m.endswith("attn2.to_k") for m in mods) and any(m.endswith("attn2.to_v") for m in mods)
        assert info["lora_modules"] == len(mods)
        assert all(".lora_" in n for n, _ in trainer.named_trainable)


def test_realdata_sets():
    from realdata import concat, has_lfw, lfw_dataset, photo_crops_dataset

    crops = photo_crops_dataset(16, per_photo=5)
    assert crops.images.shape[1:] == (3, 16, 16) and len(crops) == 5 * len(crops.domain_names())
    assert {"china", "flower"} <= set(crops.domain_names())
    both = concat([crops, digits_dataset(16, classes=(3,))])
    assert len(both) == len(crops) + 183 and "three" in both.domain_names()
    with pytest.raises(ValueError, match="resolutions"):
        concat([crops, digits_dataset(8, classes=(3,))])
    if has_lfw():
        lfw = lfw_dataset(16)
        assert len(lfw) == 200 and lfw.domain_names() == ["background", "face"]
        assert lfw.images.dtype == torch.uint8 and lfw.images.shape[1:] == (3, 16, 16)
        assert dataclasses.replace(lfw.records[0]).caption == "a photo of a face"
