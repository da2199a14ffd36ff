"""Checkpoints and resume: each step logged once, the last step always resumable, settings pinned."""
import json

import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.train import checkpoint as ckpt
from freezeasguard.engine.train.trainer import Trainer


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.c.unet.named_parameters()}


def test_a_finished_run_is_checkpointed_and_resume_extends_it(tmp_path):
    ds = tiny_digits()
    Trainer(tiny_config(tmp_path, "train.steps=3"), dataset=ds).fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]  # every=0: the end only
    more = Trainer(tiny_config(tmp_path, "train.steps=5"), dataset=ds)
    assert more.resume() == 3
    more.fit()
    assert _log_steps(tmp_path) == [1, 2, 3, 4, 5]
    ref = Trainer(tiny_config(tmp_path / "ref", "train.steps=5"), dataset=ds)
    ref.fit()
    a, b = _params(ref), _params(more)
    assert all(torch.equal(a[n], b[n]) for n in a)  # 3 + resume + 2 == 5, bit for bit


def test_after_a_crash_resume_logs_each_step_once(tmp_path):
    ds = tiny_digits()
    tr = Trainer(tiny_config(tmp_path, "train.steps=6", "train.checkpoint_every=2"), dataset=ds)

    def crash(s):  # called before step 4 is logged and checkpointed
        if s.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.fit(on_step=crash)
    assert _log_steps(tmp_path) == [1, 2, 3]  # step 3 is logged, but only step 2 is checkpointed
    again = Trainer(tiny_config(tmp_path, "train.steps=6", "train.checkpoint_every=2"), dataset=ds)
    assert again.resume() == 2
    again.fit()
    assert _log_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004",
                                                                             "step-000006"]


def test_checkpoint_every_none_writes_nothing_and_keep_prunes(tmp_path):
    ds = tiny_digits()
    Trainer(tiny_config(tmp_path / "none", "train.steps=2", "train.checkpoint_every=null"), dataset=ds).fit()
    assert not (tmp_path / "none" / "checkpoints").exists()
    Trainer(tiny_config(tmp_path / "keep", "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"),
            dataset=ds).fit()
    assert sorted(p.name for p in (tmp_path / "keep" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


def test_resume_refuses_other_settings_or_nothing_to_resume(tmp_path):
    ds = tiny_digits()
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        Trainer(tiny_config(tmp_path, "train.steps=2"), dataset=ds).resume()
    Trainer(tiny_config(tmp_path, "train.steps=2"), dataset=ds).fit()
    other = Trainer(tiny_config(tmp_path, "train.steps=4", "train.lr=0.5"), dataset=ds)
    with pytest.raises(TrainingError, match=r"other settings: \['train.lr'\]"):
        other.resume()
    frozen = Trainer(tiny_config(tmp_path, "train.steps=4", "freeze.mode=engine", "freeze.ratio=0.5"), dataset=ds)
    with pytest.raises(TrainingError, match="different set of trainable tensors"):
        frozen.resume()


def test_incomplete_checkpoint_folders_are_never_read(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 1, tensors={"t": {"x": torch.ones(2)}}, state={"k": 1})
    (root / "step-000002").mkdir()  # e.g. a copy cut short: no state.json
    found = ckpt.read_checkpoint(None, root)
    assert found.step == 1 and found.state["k"] == 1 and torch.equal(found.tensors("t")["x"], torch.ones(2))
    assert ckpt.config_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, ["a.c"]) == []
    assert ckpt.config_differences({"a": {"b": 1}}, {"a": {"b": 2}}, ["a.c"]) == ["a.b"]


def test_a_cosine_schedule_pins_its_length_and_ends_at_its_floor(tmp_path):
    from freezeasguard.engine.config import TrainConfig
    from freezeasguard.engine.train.schedule import lr_factor

    tc = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, tc) for s in range(14)]
    assert f[:2] == [0.5, 1.0] and all(a > b for a, b in zip(f[2:10], f[3:11]))
    assert f[10:] == [pytest.approx(0.1)] * 4  # reached at step `steps` and held if a run goes on
    ds = tiny_digits()
    cos = ("train.lr_schedule=cosine", "train.warmup_steps=1")
    Trainer(tiny_config(tmp_path, "train.steps=2", *cos), dataset=ds).fit()
    with pytest.raises(TrainingError, match=r"other settings: \['train.steps'\]"):
        Trainer(tiny_config(tmp_path, "train.steps=4", *cos), dataset=ds).resume()


def test_checkpoints_of_another_format_are_refused_by_name(tmp_path):
    ds = tiny_digits()
    Trainer(tiny_config(tmp_path, "train.steps=1"), dataset=ds).fit()
    state_file = tmp_path / "checkpoints" / "step-000001" / "state.json"
    state = json.loads(state_file.read_text())
    del state["format"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match="written by another version of freezeasguard"):
        Trainer(tiny_config(tmp_path, "train.steps=2"), dataset=ds).resume()

