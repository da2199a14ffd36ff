"""NVML device telemetry: a background sampler of memory, utilisation and power, and energy windows.

Memory and utilisation are sampled by a daemon thread every ``interval_s``. Energy comes from the
device's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since driver load),
read at window boundaries after ``torch.cuda.synchronize()`` so the window holds exactly the work
of its steps. The counter updates coarsely and each boundary adds a synchronisation, so windows
shorter than ``MIN_WINDOW_STEPS`` are reported with a warning.

Without NVML (no driver, no nvidia-ml-py) the sampler is inert: ``available`` is False, ``reason``
says why (from ``backends.nvml_backend``), every method is a cheap no-op and ``summary()`` returns
``{"available": False, "reason": ...}``, so publishers can leave it in their code unconditionally.

NVML numbers devices in PCI order, which may differ from CUDA's order under
``CUDA_VISIBLE_DEVICES``; pass the NVML index of the device you train on.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from freezeasguard.engine.backends import nvml_backend

MIN_WINDOW_STEPS = 20


@dataclass(frozen=True)
class NvmlSample:
    """One reading; a field is None where the device does not report it."""

    t: float  # seconds since the sampler started
    memory_used: int | None  # bytes of device memory in use (all processes)
    util_pct: float | None  # GPU utilisation over the driver's last sample period
    power_w: float | None


@dataclass
class EnergyWindow:
    """Energy over a span of training steps."""

    steps: int | None = None
    energy_j: float | None = None
    seconds: float | None = None
    warning: str | None = None

    @property
    def joules_per_step(self) -> float | None:
        if self.energy_j is None or not self.steps:
            return None
        return self.energy_j / self.steps

    @property
    def mean_power_w(self) -> float | None:
        if self.energy_j is None or not self.seconds:
            return None
        return self.energy_j / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "joules_per_step": self.joules_per_step,
                "mean_power_w": self.mean_power_w}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


class NvmlSampler:
    """Sample one device's memory, utilisation and power in the background; measure energy.

    Usage::

        with NvmlSampler(device_index=0) as nv:
            for step in ...:
                train_step()
                if step == warmup:
                    nv.mark_window(0)          # start measuring after warm-up
                elif step % 50 == 0:
                    nv.mark_window(50)         # the last 50 steps form a window
        print(nv.summary())

    or ``with nv.energy_window(steps=50): ...`` around a block of steps.

    Args:
        device_index: NVML index of the device.
        interval_s: sampling period of the background thread.
        synchronize: called at energy-window boundaries; defaults to ``torch.cuda.synchronize``
            when CUDA is available.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05,
                 synchronize: Callable[[], None] | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        backend = nvml_backend()
        self.available: bool = backend.available
        self.reason: str = backend.reason
        self.device_index = device_index
        self.interval_s = interval_s
        self.device_name: str | None = None
        self.samples: list[NvmlSample] = []
        self.windows: list[EnergyWindow] = []
        self._nvml: Any = importlib.import_module("pynvml") if self.available else None
        self._sync = synchronize or (torch.cuda.synchronize if torch.cuda.is_available() else None)
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._open: tuple[float, float | None] | None = None  # (time, energy mJ) of mark_window
        self._thread_error: str | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> "NvmlSampler":
        if not self.available or self._thread is not None:
            return self
        nv = self._nvml
        nv.nvmlInit()
        self._handle = nv.nvmlDeviceGetHandleByIndex(self.device_index)
        name = nv.nvmlDeviceGetName(self._handle)
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._sample()
        self._open = self._boundary()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()  # the state at the end, however short the run
        self._nvml.nvmlShutdown()
        self._open = None

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ----------------------------------------------------------------------------- sampling
    def _read(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, fn)(self._handle, *args)
        except self._nvml.NVMLError:  # e.g. NVMLError_NotSupported on this device
            return None

    def _sample(self) -> None:
        mem = self._read("nvmlDeviceGetMemoryInfo")
        util = self._read("nvmlDeviceGetUtilizationRates")
        power = self._read("nvmlDeviceGetPowerUsage")  # mW
        s = NvmlSample(t=time.perf_counter() - self._t0,
                       memory_used=None if mem is None else int(mem.used),
                       util_pct=None if util is None else float(util.gpu),
                       power_w=None if power is None else power / 1000.0)
        with self._lock:
            self.samples.append(s)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except Exception as exc:  # keep the training process alive; report it in summary()
            self._thread_error = f"{type(exc).__name__}: {exc}"

    # ----------------------------------------------------------------------------- energy
    def _boundary(self) -> tuple[float, float | None]:
        if self._sync is not None:
            self._sync()  # queued kernels belong to the window that launched them
        return time.perf_counter(), self._read("nvmlDeviceGetTotalEnergyConsumption")

    def _require_running(self) -> None:
        if self._thread is None:
            raise RuntimeError("NvmlSampler is not running: use it as a context manager or call start()")

    @staticmethod
    def _close(window: EnergyWindow, start: tuple[float, float | None],
               end: tuple[float, float | None]) -> EnergyWindow:
        (t0, e0), (t1, e1) = start, end
        if window.steps is None or window.steps < 0:
            raise ValueError(f"an energy window needs a non-negative step count, got {window.steps}")
        window.seconds = t1 - t0
        notes = []
        if e0 is None or e1 is None:
            notes.append("the device does not report a total-energy counter")
        else:
            window.energy_j = (e1 - e0) / 1000.0
        if window.steps < MIN_WINDOW_STEPS:
            notes.append(f"only {window.steps} steps (< {MIN_WINDOW_STEPS}): counter resolution and "
                         "boundary synchronisation dominate; use a longer window")
        window.warning = "; ".join(notes) or None
        return window

    def mark_window(self, steps: int) -> EnergyWindow | None:
        """Close the window opened by ``start()`` or the previous mark, holding ``steps`` steps.

        ``mark_window(0)`` records nothing and restarts the window (e.g. after warm-up).
        Returns the recorded window, or None.
        """
        if not self.available:
            return None
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        self._require_running()
        end = self._boundary()
        start, self._open = self._open, end
        if steps == 0:
            return None
        window = self._close(EnergyWindow(steps=steps), start, end)
        self.windows.append(window)
        return window

    @contextlib.contextmanager
    def energy_window(self, steps: int | None = None) -> Iterator[EnergyWindow]:
        """Measure the energy of the ``with`` block; give ``steps`` here or set ``window.steps``.

        A block left by an exception records nothing.
        """
        window = EnergyWindow(steps=steps)
        if not self.available:
            yield window
            return
        self._require_running()
        start = self._boundary()
        yield window
        self.windows.append(self._close(window, start, self._boundary()))

    # ----------------------------------------------------------------------------- report
    def summary(self) -> dict[str, Any]:
        """Peak/mean memory, mean utilisation and power, and energy per step over all windows."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        with self._lock:
            samples = list(self.samples)
        mem = [s.memory_used for s in samples if s.memory_used is not None]
        util = [s.util_pct for s in samples if s.util_pct is not None]
        power = [s.power_w for s in samples if s.power_w is not None]
        measured = [w for w in self.windows if w.energy_j is not None]
        steps = sum(w.steps or 0 for w in measured)
        energy = sum(w.energy_j for w in measured) if measured else None
        warnings = [f"window {i}: {w.warning}" for i, w in enumerate(self.windows) if w.warning]
        if self._thread_error:
            warnings.append(f"sampling thread stopped: {self._thread_error}")
        return {
            "available": True,
            "device_index": self.device_index,
            "device_name": self.device_name,
            "interval_s": self.interval_s,
            "samples": len(samples),
            "duration_s": samples[-1].t - samples[0].t if samples else None,
            "peak_memory_bytes": max(mem) if mem else None,
            "mean_memory_bytes": _mean(mem),
            "mean_util_pct": _mean(util),
            "mean_power_w": _mean(power),
            "peak_power_w": max(power) if power else None,
            "energy_j": energy,
            "energy_steps": steps,
            "energy_per_step_j": energy / steps if energy is not None and steps else None,
            "windows": [w.to_dict() for w in self.windows],
            "warnings": warnings,
        }
