"""Regional ``torch.compile`` of the diffusion UNet: each repeated block compiled in place.

*Regional compilation* compiles the UNet's repeated building blocks one by one instead of the whole
network as one graph: every entry of ``down_blocks``, ``mid_block`` and ``up_blocks`` (mode
``blocks``), or, finer, every ``ResnetBlock2D`` and ``Transformer2DModel`` (mode ``layers``). The
stem and head (``conv_in``, the time embedding, ``conv_norm_out``, ``conv_out``) stay eager. Each
region is one graph of forward and backward, so Dynamo never traces the UNet's Python control flow
(skip connections, timestep plumbing) and a graph break in one region cannot split the others.

Names are kept. ``nn.Module.compile()`` stores the compiled call on the module itself
(``module._compiled_call_impl``) and leaves its attributes alone, whereas ``torch.compile(module)``
wraps it in an ``OptimizedModule`` whose parameters are named ``_orig_mod.<name>``. In place, every
``named_parameters()``/``named_buffers()``/``state_dict()`` key stays what it was, so the freeze
manifest, the checkpoints (tensors by name) and the freeze proof (``TensorGuard.verify``: SHA-256 of
each frozen tensor by name) see the same tensors. The compiled call is not state: ``state_dict``,
pickling and ``copy.deepcopy`` drop it (``Module.__getstate__``), and ``uncompile_regions`` undoes it.

Order relative to the freeze wiring (``train.wiring.apply_freeze``: guard, then the flat optimizer):
compile AFTER it, i.e. ``compile_regions(trainer.c.unet)`` once the Trainer is built. Compilation
is lazy -- it happens at a region's first call -- so calling this before the wiring also works as
long as no forward runs in between; but a region traced before the guard was applied would be traced
again (Dynamo's guards see the dtype, ``requires_grad`` and class changes the guard makes) and the
work done for the unguarded graphs is wasted. The flat optimizer's ``p.data = flat[...]`` views need
nothing: parameters are graph inputs, read through their current storage at every call, and their
gradients still reach the ``AccumulateGrad`` nodes outside the graph, which add into the flat
gradient buffer's views. Forward hooks on a region (``guard.prefix``'s no_grad hooks on the frozen
top-level stages) are not part of its graph: Dynamo runs ``Module._call_impl`` as Python and traces
the hooks as small frames of their own, the region's ``forward`` under the grad mode they set.

What was measured (CPU, 1 thread, torch 2.13, diffusers 0.42, ``small`` preset at 64 px, batch 4,
bf16 autocast, engine mode with 50% of the parameters frozen by a random mask, ``Trainer.train_step``
timed with steps of the three runs interleaved after 5 warm-up steps; a shared 2-core VM whose
speed drifted by 40% between runs, so only same-run ratios mean anything):

* step time, median over 30 steps, compiled / eager: ``blocks`` 1.00 (0.573 s vs 0.575 s),
  ``layers`` 1.05 (0.605 s); the fastest step: ``blocks`` 0.92, ``layers`` 1.03. Three earlier
  runs (with layout optimization on) gave the same picture: ``blocks`` 0.97-1.07, ``layers``
  0.97-1.06 by median, ``blocks`` the fastest single step every time. At this size a CPU step is
  convolutions and matmuls, which Inductor hands to the same oneDNN/BLAS kernels eager uses; what it
  fuses (norms, activations, adds) is a small share. Regional compile does not pay on a CPU.
* compile time (the first step): ``blocks`` 519 s, ``layers`` 391 s with a cold Inductor cache
  (kernels are built by g++, ~2 s each); 50-80 s with a warm one (``/tmp/torchinductor_<user>``).
* graph breaks: none in either mode. Dynamo traces ``FrozenConv2d``'s ``autograd.Function``
  (forward and backward) and diffusers' ``AttnProcessor2_0`` (SDPA) into the region's graph.
* saved activations (``train.ledger.count_saved_activations``; a compiled region's saved tensors go
  through the same ``saved_tensors_hooks``, so the ledger still sees them): eager 52.9 MB in 801
  storages; ``blocks`` 46.5 MB in 757, ``layers`` 46.8 MB in 761. AOTAutograd's partitioner, not
  autograd's per-op rules, picks what is saved: it recomputes cheap pointwise ops (casts, adds,
  activations) instead of keeping their outputs. With Inductor's default layout optimization it was
  58.1 MB instead: a channels-last copy of every conv weight made inside the graph and saved for
  backward, for a ``FrozenConv2d`` exactly the weight copy it exists to avoid. ``INDUCTOR_OPTIONS``
  turns it off (measured: no change in step time).

``DEFAULT_MODE`` is ``blocks``: within noise of eager in every run and the fastest single step in
all four, while ``layers`` had the slowest median in three of four; 9 regions instead of 38 (fewer
guard checks per step); and at most 3 regions share one ``forward`` on an SD-shaped UNet (``layers``:
22 ResnetBlock2D, each its own cache entry, see ``_raise_recompile_limits``). ``layers`` compiles
about 25% faster.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn
from torch.utils._triton import has_triton

from freezeasguard.engine.errors import BackendError, ModelError
from freezeasguard.engine.model.families import family_of

MODES = ("blocks", "layers")
DEFAULT_MODE = "blocks"
SLOTS_PER_REGION = 4  # Dynamo cache entries allowed per compiled region (see _raise_recompile_limits)
# A diffusion transformer's blocks are its layers: its 'layers' regions are its 'blocks' regions.
_LAYER_TYPES = (ResnetBlock2D, Transformer2DModel, JointTransformerBlock, FluxTransformerBlock,
                FluxSingleTransformerBlock)
# Inductor's layout optimization makes a channels-last copy of every conv weight inside the graph and
# saves it for backward: for a FrozenConv2d that is one more bf16 copy of a frozen weight held from
# forward to backward, the cost the frozen conv path exists to avoid (see the module docstring).
INDUCTOR_OPTIONS = {"layout_optimization": False}


def region_names(unet: nn.Module, mode: str = DEFAULT_MODE) -> list[str]:
    """Qualified names of the modules ``compile_regions`` compiles in ``mode``, in module order.

    ``blocks``: the family's repeated blocks (``Family.blocks``): for a UNet each entry of
    ``down_blocks``, ``mid_block`` and each entry of ``up_blocks``; for a diffusion transformer
    each transformer block.
    ``layers``: each ``ResnetBlock2D`` and ``Transformer2DModel`` (attention + feed-forward), or a
    transformer's blocks.
    """
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode == "blocks":
        try:
            names = family_of(unet).blocks(unet)
        except ModelError:
            names = []
    else:
        names = [n for n, m in unet.named_modules() if isinstance(m, _LAYER_TYPES)]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no {mode!r} regions to compile (expected the denoiser "
                         "of a supported family: a UNet2DConditionModel or a diffusion transformer)")
    return names


def _cxx_compiler() -> tuple[str | None, str]:
    """The C++ compiler Inductor would use for CPU kernels, or None and what was looked for."""
    search = inductor_config.cpp.cxx
    search = tuple(search) if isinstance(search, (list, tuple)) else (search,)
    tried = []
    for cxx in search:
        if cxx is None:  # Inductor's optional conda download of gcc
            continue
        tried.append(cxx)
        path = shutil.which(cxx)
        if path is None:
            continue
        try:
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        return path, cxx
    return None, ", ".join(tried) or "nothing (torch._inductor.config.cpp.cxx is empty)"


def compile_blocker(backend: str = "inductor", device: torch.device | str = "cpu") -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here, or None when it can.

    Checks what is known to be missing before a first call fails deep inside Inductor: a Python
    Dynamo does not support; for Inductor on CPU a C++ compiler (``CXX`` or ``g++``) and the Python
    headers its kernels build against; for Inductor on CUDA, Triton. Backends other than Inductor
    (``aot_eager``, ``eager``, a custom callable) need Dynamo only.
    """
    if not torch._dynamo.is_dynamo_supported():
        try:
            torch._dynamo.eval_frame.check_if_dynamo_supported()
        except Exception as exc:  # the reason Dynamo gives
            return f"torch.compile is not supported here: {exc}"
        return f"torch.compile is not supported on Python {sys.version.split()[0]}"
    if backend != "inductor":
        return None
    dev = torch.device(device).type
    if dev == "cpu":
        cxx, looked_for = _cxx_compiler()
        if cxx is None:
            return (f"Inductor compiles CPU kernels with a C++ compiler and none was found (looked for {looked_for}): "
                    "install g++ (e.g. `apt-get install g++`) or point CXX at one, or use backend='aot_eager'")
        include = sysconfig.get_paths().get("include") or ""
        if not os.path.isfile(os.path.join(include, "Python.h")):
            return (f"Inductor's CPU kernels build against the Python headers and {include}/Python.h is missing: "
                    f"install the Python development package (e.g. python{sys.version_info[0]}."
                    f"{sys.version_info[1]}-dev)")
        return None
    if dev == "cuda":
        if not has_triton():
            return ("Inductor generates Triton kernels for CUDA and Triton cannot run here (pip install triton, "
                    "a version matching this torch), or use backend='aot_eager'")
        return None
    return None  # other devices: let torch.compile decide


def check_compile(backend: str = "inductor", device: torch.device | str = "cpu") -> None:
    """Raise ``BackendError`` saying why ``torch.compile`` cannot run, if it cannot."""
    why = compile_blocker(backend, device)
    if why is not None:
        raise BackendError(f"torch.compile (backend {backend!r}) cannot run on {torch.device(device)}: {why}")


def _device_of(unet: nn.Module) -> torch.device:
    p = next(unet.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def compile_regions(unet: nn.Module, *, mode: str = DEFAULT_MODE, backend: str = "inductor",
                    dynamic: bool | None = False, **compile_kwargs) -> list[str]:
    """Compile ``unet``'s repeated blocks in place (``nn.Module.compile``); returns their names.

    Args:
        unet: a diffusers ``UNet2DConditionModel``, guarded and wired already (see the module
            docstring on the order).
        mode: ``blocks`` (each down/mid/up block) or ``layers`` (each ResnetBlock2D and
            Transformer2DModel); see ``region_names``.
        backend, dynamic, compile_kwargs: passed to ``torch.compile`` for every region.
            ``dynamic=False``: training shapes are fixed, and a last short batch is one more
            static graph rather than a dynamic one for every step.

    Raises:
        ValueError: an unknown mode, or a model without such regions.
        BackendError: the backend cannot run here (``compile_blocker`` says why), checked now
            rather than at the first forward.
    """
    names = region_names(unet, mode)  # validates the mode first
    if isinstance(backend, str):
        check_compile(backend, _device_of(unet))
    mods = dict(unet.named_modules())
    already = [n for n, m in mods.items() if m._compiled_call_impl is not None]
    if already:
        raise ValueError(f"{len(already)} module(s) of this UNet are compiled already ({already[:3]}): call "
                         "uncompile_regions(unet) before compiling it again")
    if backend == "inductor" and compile_kwargs.get("mode") is None:  # torch.compile takes mode or options
        compile_kwargs["options"] = {**INDUCTOR_OPTIONS, **(compile_kwargs.get("options") or {})}
    _raise_recompile_limits([mods[n] for n in names])
    for n in names:
        mods[n].compile(backend=backend, dynamic=dynamic, **compile_kwargs)
    return names


def _raise_recompile_limits(regions: list[nn.Module]) -> None:
    """Make room in Dynamo's per-function cache for every region.

    Dynamo caches compiled graphs per *code object*: the 22 ResnetBlock2D of an SD-shaped UNet share
    one ``forward``, and each differently shaped (or differently frozen) instance is one more entry.
    Past ``recompile_limit`` (8 by default) Dynamo silently runs the rest eager. Each region may need
    a few entries (training, ``no_grad`` sampling, a short last batch), so the limits are raised to
    ``SLOTS_PER_REGION`` per region sharing a ``forward`` (never lowered).
    """
    per_code = Counter(getattr(type(m).forward, "__code__", None) for m in regions)
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, SLOTS_PER_REGION * max(per_code.values()))
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, SLOTS_PER_REGION * len(regions))


def compiled_regions(unet: nn.Module) -> list[str]:
    """Names of the modules of ``unet`` that are compiled in place."""
    return [n for n, m in unet.named_modules() if m._compiled_call_impl is not None]


def uncompile_regions(unet: nn.Module) -> list[str]:
    """Return every module compiled in place to eager; returns their names."""
    names = compiled_regions(unet)
    mods = dict(unet.named_modules())
    for n in names:
        mods[n]._compiled_call_impl = None
    return names
