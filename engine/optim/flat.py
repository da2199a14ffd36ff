"""AdamW over one flat fp32 buffer that the trainable parameters are views of.

Trainable tensors are views of ONE contiguous fp32 buffer and their gradients views of ONE gradient
buffer, so zeroing is one fill, the global norm one reduction and AdamW one call (the one-launch
Triton kernel on CUDA, torch's fused AdamW on CPU). Frozen tensors are not in the buffer at all.
"""
from __future__ import annotations

import torch
from torch import nn

from freezeasguard.kernels.adamw import fused_adamw_, global_grad_norm


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over one flat fp32 buffer that the trainable parameters are views of.

    Decay tensors (dim >= 2) come first, so weight decay applies to the range ``[0, decay_end)``.
    ``step()`` is a single call of ``freezeasguard.kernels.adamw.fused_adamw_``; the global
    gradient-clipping coefficient set by ``clip_grad_norm_`` is applied inside it (no extra pass
    over the gradients, no host sync on CUDA).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto"):
        if not named:
            raise ValueError("FlatAdamW needs at least one trainable tensor")
        ordered = [x for x in named if x[1].dim() >= 2] + [x for x in named if x[1].dim() < 2]
        device = ordered[0][1].device
        total = sum(p.numel() for _, p in ordered)
        flat = torch.empty(total, dtype=torch.float32, device=device)
        grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.segments: list[tuple[str, int, int]] = []
        off = 0
        with torch.no_grad():
            for name, p in ordered:
                n = p.numel()
                flat[off:off + n].copy_(p.detach().reshape(-1))
                p.data = flat[off:off + n].view_as(p)
                # autograd accumulates into an existing .grad in place, so these views stay live
                p.grad = grad[off:off + n].view_as(p)
                self.segments.append((name, off, n))
                off += n
        flat.grad = grad
        self.decay_end = sum(p.numel() for _, p in ordered if p.dim() >= 2)
        self.named = ordered
        # CUDA: the one-launch Triton kernel. CPU: torch's fused (vectorised, one pass) AdamW.
        self.backend = backend if backend != "auto" else ("triton" if device.type == "cuda" else "torch_fused")
        self._scale: torch.Tensor | None = None
        super().__init__([flat], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        st = self.state[flat]
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(flat)
        st["exp_avg_sq"] = torch.zeros_like(flat)

    @property
    def flat(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def describe(self) -> str:
        dec = [(n, p) for n, p in self.named if p.dim() >= 2]
        nod = [(n, p) for n, p in self.named if p.dim() < 2]
        return (f"flat optimizer groups: decay: {len(dec)} tensors, {self.decay_end:,} params; "
                f"no_decay: {len(nod)} tensors, {self.flat.numel() - self.decay_end:,} params; "
                f"one {self.flat.numel():,}-element fp32 buffer, AdamW backend {self.backend}")

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - views must survive
        self.flat.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Global L2 norm of the gradients; with ``max_norm``, clip inside the next step."""
        norm = global_grad_norm(self.flat.grad)
        self._scale = None if max_norm is None else torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        g = self.param_groups[0]
        st = self.state[self.flat]
        st["step"] += 1
        fused_adamw_(self.flat, self.flat.grad, st["exp_avg"], st["exp_avg_sq"], lr=g["lr"],
                     beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
                     weight_decay=g["weight_decay"], decay_end=self.decay_end, step=st["step"],
                     grad_scale=self._scale, backend=self.backend)
        self._scale = None

    # Optimizer.state_dict stores tensors by param index; the ints round-trip as they are.
