"""The frozen prefix run without autograd: which stages, that it saves nothing, and that it is exact."""
import copy

import torch

from freezeasguard.engine.guard.prefix import forward_order, frozen_prefix, install_prefix_skip
from freezeasguard.engine.model.components import build_components


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def _grads(unet, frozen):
    for n, p in unet.named_parameters():
        p.requires_grad_(n not in frozen)
        p.grad = None
    x, t, cond = _inputs()
    unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _down_path(unet):
    return {n for n, _ in unet.named_parameters() if n.startswith(("time_embedding.", "conv_in.", "down_blocks."))}


def test_a_frozen_down_path_is_the_prefix_runs_without_autograd_and_gives_the_same_gradients():
    unet = build_components("tiny", seed=0).unet
    frozen = _down_path(unet)
    ref = _grads(copy.deepcopy(unet), frozen)
    n_down = len(unet.down_blocks)
    stages = install_prefix_skip(unet, frozen)
    assert stages == ("time_proj", "time_embedding", "conv_in", *[f"down_blocks.{i}" for i in range(n_down)])
    assert forward_order(unet)[len(stages)] == "mid_block"
    packed, grad_mode = [], []

    def pre(mod, _args):
        grad_mode.append(torch.is_grad_enabled())
        mod._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t)
        mod._ctx.__enter__()

    def post(mod, _args, out):
        mod._ctx.__exit__(None, None, None)

    hooks = [unet.get_submodule(s).register_forward_pre_hook(pre) for s in stages[1:]] + \
        [unet.get_submodule(s).register_forward_hook(post) for s in stages[1:]]
    got = _grads(unet, frozen)
    for h in hooks:
        h.remove()
    assert grad_mode and not any(grad_mode)  # every prefix stage ran under no_grad
    assert packed == []  # and saved nothing for backward
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)  # exact


def test_a_trainable_time_embedding_ends_the_prefix_and_keeps_its_gradient():
    unet = build_components("tiny", seed=0).unet
    frozen = _down_path(unet) - {n for n, _ in unet.named_parameters() if n.startswith("time_embedding.")}
    assert frozen_prefix(unet, frozen) == ["time_proj"]
    ref = _grads(copy.deepcopy(unet), frozen)
    install_prefix_skip(unet, frozen)
    got = _grads(unet, frozen)
    assert any(n.startswith("time_embedding.") for n in got)
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_a_stage_whose_input_needs_grad_at_call_time_runs_with_autograd():
    """The static prefix is only a plan: a wrapped stage that is handed a grad-requiring input (or
    whose parameters were made trainable since) runs as usual, so no gradient is ever cut off."""
    unet = build_components("tiny", seed=0).unet
    everything = {n for n, _ in unet.named_parameters()}
    install_prefix_skip(unet, everything)  # all stages wrapped
    trainable = _down_path(unet)
    frozen = everything - trainable
    ref = _grads(copy.deepcopy(unet), frozen)
    got = _grads(unet, frozen)
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)


def test_a_copy_of_a_prefix_skipping_model_trains_its_own_tensors():
    unet = build_components("tiny", seed=0).unet
    frozen = _down_path(unet)
    install_prefix_skip(unet, frozen)
    twin = copy.deepcopy(unet)
    _grads(twin, frozen)
    assert all(p.grad is None for p in unet.parameters()) and any(p.grad is not None for p in twin.parameters())
    x, t, cond = _inputs()
    with torch.no_grad():  # and the grad mode is what it was after each stage
        twin(x, t, encoder_hidden_states=cond)
    assert torch.is_grad_enabled()
