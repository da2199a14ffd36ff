import copy
import logging

import pytest
import torch
from torch import nn

from freezeasguard.engine.errors import FrozenConvError
from freezeasguard.engine.guard.frozen_ops import FrozenConv2d, install_frozen_convs, uninstall_frozen_convs
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.presets import build_unet
from freezeasguard.engine.train.ledger import count_saved_activations

# (in, out, kernel, stride, padding, dilation, groups, bias, input size)
CONVS = [
    (4, 8, 3, 1, 1, 1, 1, True, 9),
    (4, 8, 3, 2, 1, 1, 1, True, 16),
    (6, 6, 3, 1, 2, 2, 3, False, 13),
    (8, 8, 3, 2, 0, 1, 8, True, 11),  # depthwise
    (5, 7, 1, 1, 0, 1, 1, True, 7),
    (4, 6, (5, 3), (3, 1), (2, 0), (1, 2), 2, True, 17),  # non-square everything
    (4, 8, 3, 1, "same", 2, 1, True, 10),
    (4, 8, 3, 2, "valid", 1, 1, False, 10),
]


def _frozen_pair(cin, cout, k, s, p, d, g, bias):
    stock = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).requires_grad_(False)
    ours = copy.deepcopy(stock)
    names = [n for n, _ in ours.named_parameters()]
    assert install_frozen_convs(ours, names) == 1 and type(ours) is FrozenConv2d
    return stock, ours


def _run(conv, x, go, autocast=False):
    x = x.clone().requires_grad_(True)
    with count_saved_activations(conv) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv(x)
    y.backward(go.to(y.dtype))
    return y, x.grad, saved.bytes


@pytest.mark.parametrize("cfg", CONVS)
def test_fp32_bit_identical_to_stock(cfg):
    *conv_cfg, size = cfg
    stock, ours = _frozen_pair(*conv_cfg)
    x = torch.randn(2, conv_cfg[0], size, size + 1)
    go = torch.randn_like(stock(x))
    y0, gx0, saved0 = _run(stock, x, go)
    y1, gx1, saved1 = _run(ours, x, go)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert saved0 == x.numel() * 4 and saved1 == 0  # stock keeps the input; ours keeps nothing


@pytest.mark.parametrize("cfg", CONVS[:6])
def test_bf16_autocast_matches_stock(cfg):
    *conv_cfg, size = cfg
    stock, ours = _frozen_pair(*conv_cfg)
    x = torch.randn(2, conv_cfg[0], size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        go = torch.randn(stock(x).shape)
    y0, gx0, saved0 = _run(stock, x, go, autocast=True)
    y1, gx1, saved1 = _run(ours, x, go, autocast=True)
    assert y1.dtype == y0.dtype == torch.bfloat16 and gx1.dtype == gx0.dtype == torch.float32
    # Same casts, same kernel: within bf16 rounding of a dot product (2^-8 relative).
    torch.testing.assert_close(y1, y0, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(gx1, gx0, rtol=2 ** -7, atol=1e-2)
    # Stock keeps bf16 copies of the input and of the (non-leaf-cached) weight; ours none.
    w = stock.weight
    assert saved0 == (x.numel() + w.numel()) * 2 and saved1 == 0


def _unet_pair():
    torch.manual_seed(0)
    stock = build_unet("tiny")
    conv_names = [n for m_name, m in stock.named_modules() if isinstance(m, nn.Conv2d)
                  for n in (f"{m_name}.weight", f"{m_name}.bias")]
    for n, p in stock.named_parameters():
        p.requires_grad_(n not in conv_names)
    ours = copy.deepcopy(stock)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in stock.modules())
    assert install_frozen_convs(ours, conv_names) == n_convs
    return stock, ours


def _unet_step(model, autocast):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ctx = torch.randn(2, 4, 32, generator=g)
    with count_saved_activations(model) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, torch.tensor([3, 700]), encoder_hidden_states=ctx).sample
    loss = out.float().square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved.bytes


def test_tiny_unet_all_convs_frozen_fp32_bit_identical():
    stock, ours = _unet_pair()
    loss0, g0, saved0 = _unet_step(stock, autocast=False)
    loss1, g1, saved1 = _unet_step(ours, autocast=False)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) > 100
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    assert saved1 < saved0


def test_tiny_unet_all_convs_frozen_bf16_autocast():
    stock, ours = _unet_pair()
    loss0, g0, saved0 = _unet_step(stock, autocast=True)
    loss1, g1, saved1 = _unet_step(ours, autocast=True)
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=0)
    for n in g0:
        # bf16 compute through a whole UNet: compare each gradient to its own scale.
        scale = g0[n].abs().max().clamp_min(1e-12)
        assert ((g1[n] - g0[n]).abs().max() / scale) < 2e-2, n
    assert saved1 < saved0


def test_install_keeps_parameters_and_state_dict():
    stock, ours = _unet_pair()
    before = {n: p for n, p in ours.named_parameters()}
    keys = list(stock.state_dict())
    assert list(ours.state_dict()) == keys
    assert all(before[n] is p for n, p in ours.named_parameters())
    assert uninstall_frozen_convs(ours) == sum(isinstance(m, nn.Conv2d) for m in ours.modules())
    assert not any(isinstance(m, FrozenConv2d) for m in ours.modules())
    assert list(ours.state_dict()) == keys


def test_only_fully_frozen_convs_are_switched():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, bias=False))
    assert install_frozen_convs(net, ["0.weight", "0.bias", "1.weight", "2.weight"]) == 2
    assert [type(m) for m in net] == [FrozenConv2d, nn.Conv2d, FrozenConv2d]  # 1.bias is trainable
    assert install_frozen_convs(net, ["0.weight", "0.bias", "2.weight"]) == 0  # already switched
    with pytest.raises(FrozenConvError, match="ghost.weight"):
        install_frozen_convs(net, ["ghost.weight"])
    uninstall_frozen_convs(net)
    assert install_frozen_convs(net, FreezeMask.from_patterns(net, ["0.*", "2.*"])) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONVS)
def test_cuda_matches_stock(cfg, monkeypatch):
    # cuDNN may pick another algorithm for each path, so fp32 is compared to fp32 rounding, not
    # bit for bit; TF32 is switched off so both paths really run in fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    *conv_cfg, size = cfg
    stock, ours = (m.cuda() for m in _frozen_pair(*conv_cfg))
    x = torch.randn(2, conv_cfg[0], size, size, device="cuda")
    for autocast, tol in ((False, 1e-5), (True, 2 ** -7)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            go = torch.randn(stock(x).shape, device="cuda")
        x0, x1 = (x.clone().requires_grad_(True) for _ in range(2))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            with count_saved_activations(stock) as saved0:
                y0 = stock(x0)
            with count_saved_activations(ours) as saved1:
                y1 = ours(x1)
        y0.backward(go.to(y0.dtype))
        y1.backward(go.to(y1.dtype))
        assert y0.dtype == y1.dtype and x1.grad.dtype == x0.grad.dtype
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        torch.testing.assert_close(x1.grad, x0.grad, rtol=tol, atol=tol)
        assert saved0.bytes >= x.numel() * (2 if autocast else 4) and saved1.bytes == 0


def test_unsupported_convs_are_skipped_or_refused(caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                        nn.Conv2d(4, 4, 2, padding="same"))
    names = [n for n, _ in net.named_parameters()]
    with caplog.at_level(logging.INFO, logger="freezeasguard.engine.guard.frozen_ops"):
        assert install_frozen_convs(net, names) == 0
    assert "padding_mode='reflect'" in caplog.text and "asymmetric" in caplog.text
    with pytest.raises(FrozenConvError, match="reflect"):
        install_frozen_convs(net, names, strict=True)


def test_lifted_freeze_is_an_error_not_a_silent_zero_grad():
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    install_frozen_convs(conv, ["weight", "bias"])
    conv.weight.requires_grad_(True)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with pytest.raises(FrozenConvError, match="uninstall_frozen_convs"):
        conv(x)
    with torch.no_grad():  # no graph, no gradient to lose: stock path
        conv(x)


def test_input_without_grad_uses_stock_path():
    stock, ours = _frozen_pair(3, 4, 3, 1, 1, 1, 1, True)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(stock(x), ours(x)) and not ours(x).requires_grad


def test_meta_device_forward():
    """Memory planning runs models on the meta device, where autocast does not exist."""
    conv = nn.Conv2d(4, 8, 3, padding=1, device="meta").requires_grad_(False)
    install_frozen_convs(conv, ["weight", "bias"])
    x = torch.empty(2, 4, 16, 16, device="meta", requires_grad=True)
    with count_saved_activations(conv) as saved:
        y = conv(x)
    assert y.shape == (2, 8, 16, 16) and y.requires_grad and saved.bytes == 0
