"""Frozen convolutions that do not keep their input alive for the backward pass.

For ``y = conv2d(x, W, b)`` the gradients are ``dL/dx = conv_transpose2d(dL/dy, W)`` and
``dL/dW = corr(x, dL/dy)``. When ``W`` and ``b`` are frozen only ``dL/dx`` is needed, and it does
not depend on ``x`` at all -- only on ``x``'s shape. Stock autograd still saves ``x`` (eager and
compiled: ``convolution_backward`` takes the input as an argument even with
``output_mask=[True, False, False]``), so every frozen conv pins one activation until backward.
``FrozenConv2dFunction`` saves only the weight, which is a parameter and costs no extra memory.

Under ``torch.autocast`` the forward computes in the dtype stock autocast would use (input, weight
and bias cast to the autocast dtype, fp64 left alone). The backward re-casts the weight instead
of keeping the cast copy: a frozen fp32 weight is not a grad-requiring leaf, so autocast's cast
cache would not keep it either, and holding it from forward to backward would cost 2 B/param of
every frozen conv. The gradient is returned in the input's dtype, as autograd requires.

fp32 results are bit-identical to stock autograd (the same ``convolution_backward`` call runs);
tests check it with ``torch.equal``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from freezeasguard.engine.errors import FrozenConvError
from freezeasguard.engine.guard.mask import FreezeMask

logger = logging.getLogger(__name__)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype stock autocast would run conv2d in for input ``x``, or None if autocast is off."""
    dev = x.device.type
    # Autocast exists only for some device types (not 'meta'); asking about others raises.
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    # Autocast casts only floating tensors that are not fp64; mirror that exactly.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


class FrozenConv2dFunction(torch.autograd.Function):
    """conv2d with a frozen weight and bias: saves the weight only, returns grad for the input only.

    ``padding`` must be numeric (a pair); ``FrozenConv2d`` resolves 'same'/'valid'.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        # The casts are done by hand below; autocast must not redo them (or pick another dtype).
        no_autocast = (torch.autocast(x.device.type, enabled=False) if dtype is not None
                       else contextlib.nullcontext())
        with no_autocast:
            y = F.conv2d(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype),
                         stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.input_dtype = x.dtype
        ctx.compute_dtype = dtype
        ctx.conv_args = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            (weight,) = ctx.saved_tensors
            stride, padding, dilation, groups = ctx.conv_args
            # Autograd hands back grad_out in the output's dtype, i.e. the compute dtype.
            w = _cast(weight, ctx.compute_dtype)
            # Dense grad_out: CPU backends take faster (and better-trodden) paths for it.
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, w, grad_out.contiguous(), stride, padding,
                                                dilation, groups)
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, None, None, None, None, None, None


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """Symmetric numeric padding of ``conv``, or a string saying why there is none."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                return f"padding='same' with an even effective kernel {k} (asymmetric padding)"
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(conv.padding[0]), int(conv.padding[1]))


class FrozenConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight and bias are frozen: its backward does not need the input.

    Instances are made by ``install_frozen_convs``, which changes the class of an existing conv in
    place, so parameters, hooks and ``state_dict`` keys stay exactly the same.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            # No graph will be recorded: stock conv saves nothing either.
            return super().forward(input)
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise FrozenConvError(
                "a FrozenConv2d's weight or bias requires grad: the freeze was lifted after "
                "install_frozen_convs; call uninstall_frozen_convs first (its gradient would "
                "silently be dropped otherwise)")
        padding = _numeric_padding(self)
        if isinstance(padding, str):  # checked at install; only reachable if edited since
            raise FrozenConvError(f"FrozenConv2d cannot run: {padding}")
        return FrozenConv2dFunction.apply(input, self.weight, self.bias, self.stride, padding,
                                          self.dilation, self.groups)


def install_frozen_convs(model: nn.Module, frozen_names: Iterable[str] | FreezeMask, *,
                         strict: bool = False) -> int:
    """Switch every ``nn.Conv2d`` whose weight and bias (if any) are frozen to ``FrozenConv2d``.

    Args:
        model: the network (e.g. the UNet); changed in place.
        frozen_names: names of frozen parameters, as in ``model.named_parameters()``, or a
            ``FreezeMask``. Names that are not parameters of ``model`` are an error.
        strict: raise on a frozen conv that cannot be switched (non-'zeros' padding mode,
            asymmetric 'same' padding, a subclass of ``nn.Conv2d`` with its own forward); by
            default such convs keep the stock path and a log line names them.

    Returns:
        The number of convs switched by this call.
    """
    frozen = set(frozen_names.frozen if isinstance(frozen_names, FreezeMask) else frozen_names)
    params = dict(model.named_parameters())
    unknown = sorted(frozen - set(params))
    if unknown:
        raise FrozenConvError(f"{len(unknown)} frozen name(s) are not parameters of the model: {unknown}")
    installed, skipped = 0, []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d) or isinstance(mod, FrozenConv2d):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        names = [prefix + "weight"] + ([prefix + "bias"] if mod.bias is not None else [])
        if not all(n in frozen for n in names):
            continue
        why = ("it is a subclass " + type(mod).__name__ + " (its forward may do more)"
               if type(mod) is not nn.Conv2d else _numeric_padding(mod))
        if isinstance(why, str):
            if strict:
                raise FrozenConvError(f"cannot use the frozen conv path for {mod_name or '<root>'}: {why}")
            skipped.append(f"{mod_name}: {why}")
            continue
        mod.__class__ = FrozenConv2d
        installed += 1
    if skipped:
        logger.info("frozen conv path not used (stock conv kept) for %d conv(s): %s",
                    len(skipped), "; ".join(skipped))
    return installed


def uninstall_frozen_convs(model: nn.Module) -> int:
    """Return every ``FrozenConv2d`` in ``model`` to a plain ``nn.Conv2d``; returns how many."""
    n = 0
    for mod in model.modules():
        if type(mod) is FrozenConv2d:
            mod.__class__ = nn.Conv2d
            n += 1
    return n
