"""freezeasguard engine: guarded fine-tuning of text-to-image diffusion models.

Subpackages, lowest layer first (a module imports only from layers below its own, and from its own
subpackage):

* ``errors``, ``config``, ``io``, ``backends`` -- and ``freezeasguard.kernels``;
* ``model`` (presets, folders, data, encoders, schedules, sampling), ``guard`` (what is locked, how
  it is enforced and proven), ``optim`` (the flat trainable buffer, parameter groups, optimizers);
* ``train`` (trainer, checkpoints, distributed, ledger, profiling);
* ``learn`` (mask learning) and ``service`` (guarded jobs);
* ``cli`` (the console script; nothing imports it).
"""
import logging as _logging

__version__ = "0.2.0"


def _quiet_optional_backends() -> None:
    # diffusers imports xformers and bitsandbytes whenever they are installed. Where they cannot
    # run, both log import-time warnings (xformers: no CUDA extensions for this torch;
    # bitsandbytes: no 4-bit CPU kernels from a hub) on every model load. `freezeasguard info`
    # explains what each backend can do here, and the engine logs which attention and optimizer
    # run, and why, when it runs.
    _logging.getLogger("xformers").setLevel(_logging.ERROR)
    _logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)


_quiet_optional_backends()
