import json
import math

import pytest
import torch

from freezeasguard.engine.errors import MaskError
from freezeasguard.engine.guard.mask import FreezeMask, param_budget, tensor_budget
from freezeasguard.engine.model.presets import build_unet


@pytest.fixture(scope="module")
def tiny():
    return build_unet("tiny")


@pytest.fixture(scope="module")
def sd15():
    return build_unet("sd15", device="meta")


def _sizes(model):
    return {n: p.numel() for n, p in model.named_parameters()}


def test_from_names_and_queries(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    m = FreezeMask.from_names(tiny, [names[3], names[0]])
    assert m.frozen == (names[0], names[3])  # model order, not input order
    assert len(m.trainable) == len(names) - 2
    assert m.is_frozen(names[0]) and not m.is_frozen(names[1])
    assert m.as_tensor().tolist() == [i in (0, 3) for i in range(len(names))]
    with pytest.raises(MaskError, match="not a tensor"):
        m.is_frozen("nope.weight")
    s = m.stats()
    sizes = _sizes(tiny)
    assert (s.frozen_tensors, s.total_tensors) == (2, 208)
    assert s.frozen_params == sizes[names[0]] + sizes[names[3]]
    assert s.total_params == sum(sizes.values()) == 792387
    assert s.tensor_ratio == 2 / 208 and s.param_ratio == s.frozen_params / 792387
    assert "2/208 tensors" in m.summary() and f"{s.frozen_params:,}/792,387 params" in m.summary()


def test_from_names_lists_every_unknown_name(tiny):
    with pytest.raises(MaskError) as err:
        FreezeMask.from_names(tiny, ["conv_in.weight", "bogus.a", "bogus.b"])
    assert "bogus.a" in str(err.value) and "bogus.b" in str(err.value)
    with pytest.raises(MaskError, match="single string"):
        FreezeMask.from_names(tiny, "conv_in.weight")


def test_named_shapes_mapping_is_accepted(tiny):
    shapes = {n: tuple(p.shape) for n, p in tiny.named_parameters()}
    a = FreezeMask.from_names(shapes, ["conv_in.weight"])
    b = FreezeMask.from_names(tiny, ["conv_in.weight"])
    assert a == b and a.stats() == b.stats()


def test_from_patterns(tiny):
    m = FreezeMask.from_patterns(tiny, ["conv_in.*", "*.attn1.to_q.weight"])
    expect = {n for n in _sizes(tiny) if n.startswith("conv_in.") or n.endswith(".attn1.to_q.weight")}
    assert set(m.frozen) == expect and len(expect) > 2
    with pytest.raises(MaskError) as err:
        FreezeMask.from_patterns(tiny, ["conv_in.*", "nothing_*", "Conv_In.*"])  # case-sensitive
    assert "nothing_*" in str(err.value) and "Conv_In.*" in str(err.value)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.37, 0.5, 1.0])
def test_random_by_tensors_is_exact_and_seeded(tiny, ratio):
    m = FreezeMask.random(tiny, ratio, by="tensors", seed=3)
    assert len(m.frozen) == round(ratio * 208) == tensor_budget(ratio, 208)
    assert m == FreezeMask.random(tiny, ratio, by="tensors", seed=3)
    if 0 < ratio < 1:
        assert m != FreezeMask.random(tiny, ratio, by="tensors", seed=4)


def test_random_does_not_depend_on_parameter_order(tiny):
    sizes = _sizes(tiny)
    reversed_sizes = dict(reversed(list(sizes.items())))
    a = FreezeMask.random(sizes, 0.3, seed=11)
    b = FreezeMask.random(reversed_sizes, 0.3, seed=11)
    assert a.frozen_set == b.frozen_set


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.7, 0.999])
def test_random_by_params_is_a_greedy_fill_under_budget(tiny, ratio):
    m = FreezeMask.random(tiny, ratio, by="params", seed=0)
    s = m.stats()
    budget = param_budget(ratio, s.total_params)
    assert s.frozen_params <= budget
    # Greedy fill property: no left-out tensor fits into what is left of the budget.
    sizes = _sizes(tiny)
    room = budget - s.frozen_params
    assert min(sizes[n] for n in m.trainable) > room


def test_param_budget_edges():
    assert param_budget(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert param_budget(1.0, 859520964) == 859520964
    assert param_budget(0.0, 10) == 0


@pytest.mark.parametrize("bad", [-0.01, 1.5, math.nan])
def test_ratio_is_validated(tiny, bad):
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        FreezeMask.random(tiny, bad)
    with pytest.raises(MaskError, match="'tensors' or 'params'"):
        FreezeMask.random(tiny, 0.2, by="layers")


def test_from_scores_is_exact_top_k(tiny):
    names = list(_sizes(tiny))
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(len(names), generator=g)
    m = FreezeMask.from_scores(tiny, scores, 0.25, by="tensors")
    k = round(0.25 * len(names))
    top = set(names[i] for i in torch.topk(scores, k).indices.tolist())
    assert m.frozen_set == top
    # by name or in order: the same mask
    assert m == FreezeMask.from_scores(tiny, dict(zip(names, scores.tolist())), 0.25)


def test_from_scores_by_params_hand_example():
    sizes = {"a": 50, "b": 30, "c": 20, "d": 10}
    scores = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    # budget floor(0.6 * 110) = 66: a (50) fits, b (30) and c (20) do not, d (10) does.
    m = FreezeMask.from_scores(sizes, scores, 0.6, by="params")
    assert m.frozen == ("a", "d") and m.stats().frozen_params == 60


def test_from_scores_ties_break_by_name():
    sizes = {"z": 1, "y": 1, "x": 1, "w": 1}
    m = FreezeMask.from_scores(sizes, {"z": 1.0, "y": 1.0, "x": 1.0, "w": 0.0}, 0.5)
    assert m.frozen_set == {"x", "y"}


def test_from_scores_validation(tiny):
    names = list(_sizes(tiny))
    with pytest.raises(MaskError, match="208 tensors"):
        FreezeMask.from_scores(tiny, [1.0] * 10, 0.2)
    with pytest.raises(MaskError, match="missing"):
        FreezeMask.from_scores(tiny, {names[0]: 1.0}, 0.2)
    bad = [0.0] * len(names)
    bad[5] = math.nan
    with pytest.raises(MaskError, match=names[5]):
        FreezeMask.from_scores(tiny, bad, 0.2)


def test_sd15_tensor_budget_vs_param_budget(sd15):
    """A tensor-count budget can freeze a very different fraction of parameters."""
    sizes = _sizes(sd15)
    assert len(sizes) == 686 and sum(sizes.values()) == 859520964
    small = [n for n, k in sizes.items() if k < 4096]
    assert len(small) == 393
    m = FreezeMask.from_scores(sd15, {n: float(sizes[n] < 4096) for n in sizes}, 0.5)
    s = m.stats()
    assert s.frozen_tensors == 343 and s.param_ratio < 0.001  # half the tensors, ~0% of params
    p = FreezeMask.random(sd15, 0.2, by="params", seed=0).stats()
    assert 0.199 < p.param_ratio <= 0.2
    t = FreezeMask.random(sd15, 0.2, by="tensors", seed=0).stats()
    assert t.frozen_tensors == 137


def test_save_and_from_file_round_trip(tiny, tmp_path):
    m = FreezeMask.random(tiny, 0.3, seed=1)
    path = m.save(tmp_path / "mask.json")
    on_disk = json.loads(path.read_text())
    assert on_disk["frozen"] == list(m.frozen)
    assert on_disk["counts"]["tensors"]["frozen"] == len(m.frozen)
    assert FreezeMask.from_file(path, tiny) == m


def test_from_file_errors(tiny, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        FreezeMask.from_file(tmp_path / "bad.json", tiny)
    (tmp_path / "list.json").write_text('["conv_in.weight"]')
    with pytest.raises(MaskError, match="frozen"):
        FreezeMask.from_file(tmp_path / "list.json", tiny)
    (tmp_path / "unknown.json").write_text('{"frozen": ["conv_in.weight", "ghost.weight"]}')
    with pytest.raises(MaskError, match="ghost.weight"):
        FreezeMask.from_file(tmp_path / "unknown.json", tiny)
    with pytest.raises(MaskError, match="does not exist"):
        FreezeMask.from_file(tmp_path / "absent.json", tiny)


def test_mask_is_immutable(tiny):
    m = FreezeMask.random(tiny, 0.2)
    with pytest.raises(AttributeError):
        m.frozen_set = frozenset()  # type: ignore[misc]
