"""Guarded training under bf16 frozen storage holds no fp32 copy of the frozen tensors in memory:
the proof reads the base values from disk, still proves, still catches a changed frozen tensor, and
the export still carries the base's fp32 bytes bit for bit."""
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.guard.originals import FrozenOriginals
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.train.peak import held_bytes
from freezeasguard.engine.train.trainer import Trainer


def test_only_values_the_cast_rounds_are_stored_and_read_back_exactly():
    t = {"exact": torch.tensor([1.0, 0.5, -2.0, 0.0]), "rounded": torch.tensor([1.0 + 2**-20, 3.0])}
    o = FrozenOriginals.spill(t, torch.bfloat16)
    assert list(o) == ["rounded"] and "exact" not in o and o.host_bytes == 0
    assert torch.equal(o["rounded"], t["rounded"]) and o["rounded"].dtype == torch.float32
    path = o.path
    assert path.is_file()
    del o
    assert not path.exists()  # the private file goes with its object


def test_guarded_bf16_training_holds_no_host_copies_and_still_proves(tmp_path):
    ds = tiny_digits()
    cfg = tiny_config(tmp_path, "freeze.mode=engine", "freeze.ratio=0.5", "train.mixed_precision=bf16",
                      "train.steps=2")
    comps = build_components("tiny", resolution=16, seed=0)
    base = {k: v.detach().clone() for k, v in comps.unet.state_dict().items()}
    tr = Trainer(cfg, components=comps, dataset=ds)
    guard = tr.guard
    assert guard.low_precision and len(guard.originals) > 0
    assert held_bytes([guard], "cpu") == 0  # not one byte of frozen values in the guard
    tr.fit()
    report = tr.verify_frozen()
    assert report.ok, report.summary()
    state = tr.unet_state_for_export()
    for n in guard.frozen_names:  # the base's values and dtype, bit for bit
        assert state[n].dtype == base[n].dtype and torch.equal(state[n], base[n]), n
    # a changed live bf16 copy of a frozen tensor is caught
    name = next(iter(guard.originals))
    live = dict(tr.c.unet.named_parameters())[name]
    assert live.dtype == torch.bfloat16
    with torch.no_grad():
        live.view(-1)[0] += 1.0
    bad = tr.verify_frozen()
    assert not bad.ok and name in bad.hash_mismatch


def test_the_streamed_file_is_a_safetensors_file_with_every_dtype_and_shape():
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).double(),
         "c": torch.randn(2, 2, 2, generator=g).half()}
    o = FrozenOriginals.spill(t, torch.bfloat16)
    assert list(o) == ["a", "b", "c"]
    back = load_file(str(o.path))
    assert all(torch.equal(back[n], t[n]) and back[n].dtype == t[n].dtype for n in t)
