import dataclasses
import json

import pytest

from freezeasguard.engine import config as C


def test_presets_resolve_and_validate():
    for name in C.CONFIG_PRESETS:
        cfg = C.resolve(preset=name)
        assert cfg.model.preset == name


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(C.ConfigError, match=r"'train\.lrr'.*'lr'"):
        C.resolve(overrides=["train.lrr=1e-3"])
    with pytest.raises(C.ConfigError, match="'tran'.*'train'"):
        C.from_dict(C.FinetuneConfig, {"tran": {}})
    with pytest.raises(C.ConfigError, match="unknown config preset 'tinny'.*'tiny'"):
        C.resolve(preset="tinny")


def test_type_errors_and_validation():
    with pytest.raises(C.ConfigError, match="train.steps: expected an integer"):
        C.resolve(overrides=["train.steps=abc"])
    with pytest.raises(C.ConfigError, match="mixed_precision"):
        C.resolve(overrides=["train.mixed_precision=fp8"])
    with pytest.raises(C.ConfigError, match="divisible"):
        C.resolve(overrides=["train.batch_size=6", "train.grad_accum=4"])


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.002\n  steps: 7\ndata:\n  domains: [one, two]\n")
    cfg = C.resolve(preset="tiny", file=str(f), overrides=["train.steps=9", "train.max_grad_norm=null"])
    assert cfg.train.lr == 0.002 and cfg.train.steps == 9 and cfg.train.max_grad_norm is None
    assert cfg.data.domains == ["one", "two"]
    assert cfg.train.batch_size == C.CONFIG_PRESETS["tiny"]["train"]["batch_size"]
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert C.resolve(file=str(j)) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(C.ConfigError, match="not valid"):
        C.resolve(file=str(bad))


def test_every_field_has_a_docstring():
    for cls in (C.ModelConfig, C.DataConfig, C.TrainConfig, C.FreezeConfig, C.FinetuneConfig):
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (cls.__name__, missing)
