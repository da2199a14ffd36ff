"""The shape-only memory plan against the exact ledger of real setups, and on the meta device."""
import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.train.memplan import memory_plan
from freezeasguard.engine.train.trainer import Trainer

SETUPS = [  # (freeze.mode, optimizer_states, update_in_backward)
    ("full", "fp32", False), ("naive", "fp32", False), ("engine", "fp32", False), ("engine", "bf16", False),
    ("engine", "8bit", False), ("engine", "fp32", True), ("engine", "8bit", True),
]


@pytest.mark.parametrize("mode, states, in_backward", SETUPS)
def test_the_plan_is_the_ledger_byte_for_byte(tmp_path, mode, states, in_backward):
    base = build_components("tiny", seed=0)
    mask = FreezeMask.random(base.unet, 0.5, by="params", seed=0)
    plan = memory_plan(base.unet, mask.frozen, mode=mode, states=states, in_backward=in_backward)
    over = [f"freeze.mode={mode}", f"train.optimizer_states={states}", "train.mixed_precision=bf16",
            f"train.update_in_backward={str(in_backward).lower()}", "train.steps=1"]
    if mode != "full":
        Manifest.build(base.unet, mask, provenance={"method": "random"}).save(tmp_path / "m.json")
        over.append(f"freeze.manifest={tmp_path / 'm.json'}")
    tr = Trainer(tiny_config(tmp_path / "run", *over), components=base, dataset=tiny_digits())
    tr.measure_memory = True
    tr.train_step()
    led = tr.last_ledger
    assert plan.frozen_weight_bytes == led.frozen_weight_bytes
    assert plan.trainable_weight_bytes == led.trainable_weight_bytes
    assert plan.grad_bytes == led.grad_bytes
    assert plan.grad_transient_bytes == led.grad_transient_bytes
    assert plan.optimizer_state_bytes == led.optimizer_state_bytes
    assert plan.static_bytes == led.static_bytes


def test_sd15_on_the_meta_device():
    unet = build_unet("sd15", device="meta")
    names = [n for n, _ in unet.named_parameters()]
    full = memory_plan(unet, [], mode="full")
    assert full.params == 859_520_964
    half = FreezeMask.random(unet, 0.5, by="params", seed=0)
    eng = memory_plan(unet, half.frozen, mode="engine", states="8bit", in_backward=True)
    assert eng.frozen_params == half.stats().frozen_params and eng.grad_bytes == 0
    # 8-bit moments + fp32 master + bf16 frozen: about (2 + 4) / 2 + 2 / 2 = 4 of full's 16 B/param
    assert 0.24 < eng.static_bytes / full.static_bytes < 0.27
    assert eng.per_device(8).static_bytes * 8 >= eng.static_bytes
    with pytest.raises(ValueError, match="not in the model"):
        memory_plan(unet, ["nope"], mode="naive")
    with pytest.raises(ValueError, match="engine options"):
        memory_plan(unet, names[:1], mode="naive", states="8bit")
    assert torch.device("meta") == next(unet.parameters()).device
