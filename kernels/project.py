"""Updates projected off locked subspaces: the enforcement of a direction lock, batched by shape.

A lock on a weight matrix ``W`` (``m x n``; a conv kernel read as ``out x in*k*k``) names an
orthonormal basis ``U`` (``m x r``, output side) and/or ``V`` (``n x s``, input side). An update
``D`` respects the lock when ``U^T D = 0`` and ``D V = 0``; the nearest one that does is

    D  <-  (I - U U^T) D (I - V V^T)

(the two sides commute: one multiplies from the left, the other from the right). On a GPU a group
of same-shape tensors is one batched GEMM per side (``baddbmm``) over a ``[G, m, n]`` view of the
flat parameter buffer; bases of different ranks in one group are zero-padded, which changes
nothing (a zero column projects nothing). ``project_off_ref`` is the explicit reference.
"""
from __future__ import annotations

import torch


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix a lock acts on: ``out x (in * k * k)`` (a view where possible)."""
    return t.reshape(t.shape[0], -1)


def _check(d: torch.Tensor, out: torch.Tensor | None, inp: torch.Tensor | None) -> None:
    if d.dim() not in (2, 3):
        raise ValueError(f"updates must be [m, n] or [G, m, n], got shape {tuple(d.shape)}")
    for name, b, dim in (("out", out, -2), ("inp", inp, -1)):
        if b is None:
            continue
        if b.dim() != d.dim() or b.shape[:-2] != d.shape[:-2] or b.shape[-2] != d.shape[dim]:
            raise ValueError(f"basis {name} of shape {tuple(b.shape)} does not fit updates of shape {tuple(d.shape)}")
        if b.dtype != d.dtype or b.device != d.device:
            raise ValueError(f"basis {name} is {b.dtype} on {b.device}, updates are {d.dtype} on {d.device}")


def project_off_(d: torch.Tensor, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> torch.Tensor:
    """Project ``d`` (``[m, n]`` or ``[G, m, n]``) off ``span(out)`` on the left and ``span(inp)`` on
    the right, in place: one (batched) GEMM pair per side, a ``[G, r, n]`` / ``[G, m, s]`` temporary."""
    _check(d, out, inp)
    if d.dim() == 2:
        if out is not None and out.shape[-1]:
            d.addmm_(out, out.mT @ d, alpha=-1.0)
        if inp is not None and inp.shape[-1]:
            d.addmm_(d @ inp, inp.mT, alpha=-1.0)
        return d
    if out is not None and out.shape[-1]:
        d.baddbmm_(out, torch.bmm(out.mT, d), alpha=-1.0)
    if inp is not None and inp.shape[-1]:
        d.baddbmm_(torch.bmm(d, inp), inp.mT, alpha=-1.0)
    return d


def project_off_ref(d: torch.Tensor, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``(I - U U^T) d (I - V V^T)`` with explicit projector matrices, in float64."""
    _check(d, out, inp)
    x = d.double()
    eye = torch.eye
    if out is not None:
        u = out.double()
        x = (eye(x.shape[-2], dtype=x.dtype, device=x.device) - u @ u.mT) @ x
    if inp is not None:
        v = inp.double()
        x = x @ (eye(x.shape[-1], dtype=x.dtype, device=x.device) - v @ v.mT)
    return x.to(d.dtype)


def locked_energy(d: torch.Tensor, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> torch.Tensor:
    """``||U^T d||^2 + ||d V||^2`` in float64 (per batch entry for ``[G, m, n]``): the squared size of
    the part of ``d`` a lock forbids (0 for an update that respects it)."""
    _check(d, out, inp)
    x = d.double()
    e = torch.zeros(x.shape[:-2], dtype=torch.float64, device=x.device)
    if out is not None:
        e = e + (out.double().mT @ x).square().sum((-2, -1))
    if inp is not None:
        e = e + (x @ inp.double()).square().sum((-2, -1))
    return e
