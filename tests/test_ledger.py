import math

import pytest
import torch
from torch import nn

from freezeasguard.engine.backends import bitsandbytes_backend
from freezeasguard.engine.errors import LedgerError
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.train.ledger import count_saved_activations, memory_ledger


# ------------------------------------------------------------------------------ saved activations
def test_counts_each_storage_once():
    a = torch.randn(10, 10, requires_grad=True)
    b = torch.randn(10, 10, requires_grad=True)
    with count_saved_activations() as saved:
        y = a * a  # saves a twice
        z = (y * b).sum()  # saves y and b
    assert saved.saves == 4 and saved.count == 3 and saved.bytes == 3 * 400
    assert saved.by_dtype == {"float32": 1200}
    z.backward()  # the pack/unpack hooks leave the graph intact
    torch.testing.assert_close(a.grad, 2 * a * b)


def test_a_saved_view_counts_its_whole_storage():
    a = torch.randn(100, requires_grad=True)
    base = a * 1
    with count_saved_activations() as saved:
        base[:10].sin()  # sin saves its (view) input; the view pins all 100 elements
    assert saved.bytes == 400 and saved.count == 1


def test_parameters_are_excluded_also_as_views_of_a_flat_buffer():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with count_saved_activations(lin) as saved:
        lin(x).sum()  # addmm saves x and the weight
    assert saved.bytes == x.numel() * 4 and saved.count == 1

    flat = torch.zeros(40)
    p1 = nn.Parameter(flat[:20].view(4, 5))
    p2 = nn.Parameter(flat[20:].view(5, 4))
    assert p1.untyped_storage().data_ptr() == p2.untyped_storage().data_ptr()
    x = torch.randn(3, 5, requires_grad=True)
    with count_saved_activations([p1]) as saved:  # only p1 named: p2 shares its buffer
        (x @ p2).sum()
    assert saved.bytes == x.numel() * 4


def test_counts_on_the_meta_device():
    x = torch.empty(4, 16, device="meta", requires_grad=True)
    w = torch.empty(16, 16, device="meta", requires_grad=True)
    with count_saved_activations() as saved:
        torch.tanh(x @ w)  # saves x, w, and tanh's output
    assert saved.count == 3 and saved.bytes == (64 + 256 + 64) * 4


# ------------------------------------------------------------------------------ static memory
@pytest.fixture
def masked_tiny():
    model = build_unet("tiny")
    mask = FreezeMask.random(model, 0.5, by="params", seed=0)
    for n, p in model.named_parameters():
        p.requires_grad_(not mask.is_frozen(n))
    return model, mask


def _one_step(model, opt):
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 32)
    model(x, torch.tensor([1, 2]), encoder_hidden_states=ctx).sample.square().mean().backward()
    opt.step()


def test_fp32_adamw_matches_formula(masked_tiny):
    model, mask = masked_tiny
    s = mask.stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    _one_step(model, opt)
    led = memory_ledger(model, opt, saved_activation_bytes=1234, frozen_names=mask.frozen)
    F, T, nT = s.frozen_params, s.trainable_params, len(trainable)
    assert led.weights_frozen == {"float32": 4 * F} and led.weights_trainable == {"float32": 4 * T}
    assert (led.frozen_params, led.trainable_params) == (F, T)
    assert led.grad_bytes == 4 * T
    # m and v in fp32, plus torch's per-tensor fp32 step counter.
    assert led.optimizer_state_by_key == {"exp_avg": 4 * T, "exp_avg_sq": 4 * T, "step": 4 * nT}
    assert led.optimizer_state_bytes == 8 * T + 4 * nT
    assert led.static_bytes == 4 * F + 16 * T + 4 * nT
    assert led.total_bytes == led.static_bytes + 1234
    d = led.to_dict()
    assert d["static_bytes"] == led.static_bytes and d["activation_bytes"] == 1234
    table = led.table()
    assert "weights frozen (float32)" in table and "optimizer state" in table and "MiB" in table
    assert f"{led.static_bytes:,}" in table


def test_bf16_frozen_weights_and_flat_grad_buffer(masked_tiny):
    model, mask = masked_tiny
    s = mask.stats()
    params = dict(model.named_parameters())
    for n in mask.frozen:
        params[n].data = params[n].data.bfloat16()  # frozen weights only need to be read
    # Grads as views of one flat buffer: it must be counted once, as a whole.
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in trainable))
    offset = 0
    for p in trainable:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    led = memory_ledger(model)
    assert led.weights_frozen == {"bfloat16": 2 * s.frozen_params}
    assert led.weights_trainable == {"float32": 4 * s.trainable_params}
    assert led.grad_bytes == 4 * s.trainable_params == flat.untyped_storage().nbytes()
    assert led.optimizer_state_bytes == 0
    assert led.static_bytes == 2 * s.frozen_params + 8 * s.trainable_params


@pytest.mark.skipif(not bitsandbytes_backend().available, reason="bitsandbytes unusable")
def test_bitsandbytes_adamw8bit_state():
    import bitsandbytes as bnb

    model = nn.Sequential(nn.Linear(64, 100), nn.Linear(100, 30))  # weights >= 4096, biases not
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    big = [p.numel() for p in model.parameters() if p.numel() >= 4096]
    small = [p.numel() for p in model.parameters() if p.numel() < 4096]
    assert big and small
    # Per large tensor: two uint8 states + two fp32 absmax per block of 256; one shared 256-entry
    # fp32 quantile map per state. Small tensors keep two fp32 states.
    expect = (sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in big) + 2 * 256 * 4
              + sum(8 * n for n in small))
    led = memory_ledger(model, opt)
    assert led.optimizer_state_bytes == expect
    assert led.optimizer_state_by_key["state1"] == sum(big) + 4 * sum(small)


def test_frozen_names_validation_and_buffers():
    model = nn.Linear(4, 3)
    model.weight.requires_grad_(False)
    model.register_buffer("frozen_w16", torch.zeros(3, 4, dtype=torch.bfloat16))
    led = memory_ledger(model, frozen_names=["weight", "frozen_w16"])
    assert led.weights_frozen == {"float32": 48, "bfloat16": 24} and led.frozen_params == 24
    with pytest.raises(LedgerError, match="require grad.*bias"):
        memory_ledger(model, frozen_names=["bias"])
    with pytest.raises(LedgerError, match="ghost"):
        memory_ledger(model, frozen_names=["ghost"])
    with pytest.raises(LedgerError, match="no .state"):
        memory_ledger(model, optimizer=object())


def test_activations_measured_with_the_ledger(masked_tiny):
    model, _ = masked_tiny
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 32)
    with count_saved_activations(model) as saved:
        out = model(x, torch.tensor([5]), encoder_hidden_states=ctx).sample
    led = memory_ledger(model, saved_activation_bytes=saved)
    assert led.activation_bytes == saved.bytes > 0
    out.sum().backward()


@pytest.mark.gpu
def test_cuda_allocator_peaks_are_reported():
    torch.cuda.reset_peak_memory_stats()
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    led = memory_ledger(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert led.device.startswith("cuda") and led.grad_bytes == 4 * n
    assert led.cuda_max_reserved >= led.cuda_max_allocated >= 16 * n


def test_the_peak_model_counts_gradients_once_and_the_flat_buffers_padding():
    from freezeasguard.engine.optim.flat import FlatAdamW

    lin = nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 3))
    torch_opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 10)).sum().backward()
    torch_opt.step()
    led = memory_ledger(lin, torch_opt, saved_activation_bytes=1000)
    n = sum(p.numel() for p in lin.parameters())
    # set_to_none gradients: allocated in the step, while backward frees the activations
    assert not led.grads_between_steps and led.grad_bytes == 4 * n
    assert led.held_bytes == 4 * n + led.optimizer_state_bytes
    assert led.peak_bytes == led.held_bytes + max(1000, 4 * n) and led.peak_bytes < led.total_bytes
    assert memory_ledger(lin).grads_between_steps  # no optimizer: the gradients found are what is held

    net = nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 3))
    opt = FlatAdamW(list(net.named_parameters()), lr=1e-3, states="8bit", backend="torch")
    net(torch.randn(2, 10)).sum().backward()
    opt.step()
    led = memory_ledger(net, opt, saved_activation_bytes=1000)
    slots = opt.flat.numel()
    assert slots % 256 == 0 and led.weight_padding_bytes == 4 * (slots - n) > 0
    assert led.code_table_bytes == 4 * (256 + 255) * 2 and not led.grads_between_steps
    assert led.held_bytes == led.weight_bytes + led.weight_padding_bytes + led.optimizer_state_bytes + \
        led.code_table_bytes
    assert "flat buffer padding" in led.table() and "peak (model)" in led.table()
