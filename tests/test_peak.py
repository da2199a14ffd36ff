"""Measured peaks (train.peak) against allocations of known size, and the memory ledger's model of a
training step's peak against the measured peak of every setup."""
import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.train.peak import cpu_above_start, held_bytes, measure_step_peak
from freezeasguard.engine.train.trainer import Trainer

MiB = 1 << 20


def test_the_cpu_peak_is_exact_for_allocations_of_known_size():
    kept = []

    def step():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 6 MiB live
        del a  # 2 MiB
        kept.append(torch.empty(3 << 20))  # 14 MiB live: the peak
        del b
        return "done"

    lin = torch.nn.Linear(100, 100)
    out, pk = measure_step_peak(step, [lin], "cpu")
    assert out == "done" and pk.above_start == 14 * MiB
    assert pk.held_at_start == 4 * (100 * 100 + 100) and pk.peak_bytes == pk.held_at_start + 14 * MiB
    assert cpu_above_start([(3, -5), (1, 10), (2, 4)]) == 14 and cpu_above_start([(0, -1)]) == 0


def test_held_bytes_counts_a_flat_buffer_once_with_its_gradients_and_other_devices_not():
    flat = torch.zeros(30)
    a, b = torch.nn.Parameter(flat[:10]), torch.nn.Parameter(flat[10:])
    a.grad = torch.zeros(10)
    holder = {"params": [a, b], "again": [b], "meta": torch.empty(1000, device="meta")}
    assert held_bytes([holder], "cpu") == 4 * 30 + 4 * 10


SETUPS = {
    "full": ("freeze.mode=full",),
    "naive": ("freeze.mode=naive", "freeze.ratio=0.5"),
    "engine": ("freeze.mode=engine", "freeze.ratio=0.5"),
    "engine+inbackward": ("freeze.mode=engine", "freeze.ratio=0.5", "train.update_in_backward=true"),
    "engine+8bit": ("freeze.mode=engine", "freeze.ratio=0.5", "train.optimizer_states=8bit"),
    "engine+inbackward+8bit": ("freeze.mode=engine", "freeze.ratio=0.5", "train.update_in_backward=true",
                               "train.optimizer_states=8bit"),
}
# What the ledger leaves out of its model: the step's transients that are neither saved activations
# nor gradients (the forward's unsaved intermediates, backward's gradients of activations, the
# optimizer step's working memory, at most one gradient chunk allocated ahead of its gradients).
# Measured here they are 2.2-3.8% of the peak (the small preset at 64 px, batch 4: 0.5-3.6%); what
# outlives a step is modelled exactly (tested byte for byte below). Memory is deterministic, so
# the bound is a measured margin, not noise.
TOLERANCE = 0.06


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = {}
    for name, over in SETUPS.items():
        tr = Trainer(tiny_config(tmp_path_factory.mktemp(name), "train.mixed_precision=bf16", "train.lr=1e-4",
                                 *over), dataset=tiny_digits())
        tr.measure_memory = True
        tr.train_step()  # the ledger's step (and torch AdamW's state allocated)
        tr.measure_memory = False
        _, pk = measure_step_peak(tr.train_step, [tr.c.unet, tr.optimizer, tr.guard], tr.device)
        out[name] = (tr, tr.last_ledger, pk)
    return out


@pytest.mark.parametrize("name", list(SETUPS))
def test_the_ledgers_peak_model_agrees_with_the_measured_peak(measured, name):
    tr, led, pk = measured[name]
    assert led.held_bytes == pk.held_at_start  # what outlives a step: exact
    assert abs(led.peak_bytes - pk.peak_bytes) <= TOLERANCE * pk.peak_bytes, (led.peak_bytes, pk)
    # the step's own allocations: at least the larger of activations and gradients, as modelled
    assert pk.above_start >= 0.9 * (led.peak_bytes - led.held_bytes)


def test_no_gradient_buffer_lives_between_steps(measured):
    for name in ("engine", "engine+8bit"):
        tr, led, pk = measured[name]
        assert not led.grads_between_steps and led.grad_bytes > 0  # there within the step
        assert all(p.grad is None for _, p in tr.named_trainable) and tr.optimizer.grads.allocated_bytes == 0
        assert tr.optimizer.flat.grad is None
    tr, led, _ = measured["engine+8bit"]
    assert led.weight_padding_bytes > 0 and led.code_table_bytes == 4 * (256 + 255) * 2


def test_the_engine_peak_is_below_naive_and_full(measured):
    peak = {n: measured[n][2].peak_bytes for n in measured}
    assert peak["engine"] < peak["naive"] < peak["full"]
    assert peak["engine+inbackward+8bit"] < peak["engine+8bit"] < peak["engine"]


@pytest.mark.slow
def test_on_the_small_preset_the_engine_default_peaks_under_060_full_and_085_naive(tmp_path):
    """The engine's goal, on the bench's own setup (bench/suite.py: small preset, 64 px, batch 4,
    bf16 autocast, 50% of parameters frozen by a seeded random mask), measured on the second step."""
    import argparse

    from suite import Scenario, build_trainer, step_roots

    from freezeasguard.engine.model.data import digits_dataset

    args = argparse.Namespace(preset="small", resolution=64, batch=4, dtype="bf16", steps=1, warmup=1, lr=1e-4,
                              classes=2, seed=0)
    data = digits_dataset(64, classes=[0, 1])
    peak = {}
    for sc in (Scenario("full", "full", 0.0), Scenario("naive", "naive", 0.5), Scenario("engine", "engine", 0.5)):
        tr = build_trainer(sc, args, data, tmp_path)
        tr.train_step()
        peak[sc.name] = measure_step_peak(tr.train_step, step_roots(tr), tr.device)[1].peak_bytes
        del tr
    assert peak["engine"] <= 0.60 * peak["full"] and peak["engine"] <= 0.85 * peak["naive"], peak


@pytest.mark.gpu
def test_the_cuda_peak_counts_what_the_roots_hold_once_and_the_step_above_its_start():
    dev = torch.device("cuda")
    lin = torch.nn.Linear(256, 256, device=dev)
    other = torch.empty(1 << 20, device=dev)  # allocated, but no root reaches it: not this setup's

    def step():
        a = torch.empty(1 << 20, device=dev)  # 4 MiB
        b = torch.empty(1 << 19, device=dev)  # 6 MiB live: the peak
        del a, b

    _, pk = measure_step_peak(step, [lin], dev)
    assert pk.held_at_start == 4 * (256 * 256 + 256) and pk.above_start == 6 * MiB
    del other
