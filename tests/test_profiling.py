import statistics
import sys
import time
import types

import pytest

from freezeasguard.engine import backends
from freezeasguard.engine.train.profiling import MIN_WINDOW_STEPS, NvmlSampler

MiB = 1 << 20


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: scripted memory readings, an energy counter that adds 1 J per read."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, power=True, energy=True, init_fails=False):
        super().__init__("pynvml")
        self.power, self.energy, self.init_fails = power, energy, init_fails
        self.inits = self.shutdowns = 0
        self.mem_reads = self.energy_mj = 0

    def nvmlInit(self):
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return "999.1"

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, h):
        self.mem_reads += 1
        return types.SimpleNamespace(used=(100, 300, 200)[self.mem_reads % 3] * MiB, total=1000 * MiB)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50, memory=10)

    def nvmlDeviceGetPowerUsage(self, h):
        if not self.power:
            raise self.NVMLError("Not Supported")
        return 250_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy:
            raise self.NVMLError("Not Supported")
        self.energy_mj += 1000
        return self.energy_mj


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(**kw):
        fake = FakeNvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        backends.nvml_backend.cache_clear()
        return fake

    yield install
    backends.nvml_backend.cache_clear()  # let later callers probe the real library again


def _wait_for_samples(nv, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(nv.samples) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(nv.samples) >= n


def _check_inert(nv):
    assert not nv.available and nv.reason
    with nv as same:
        assert same is nv and not nv.running
        assert nv.mark_window(50) is None
        with nv.energy_window(steps=30) as w:
            pass
        assert w.energy_j is None
    assert nv.summary() == {"available": False, "reason": nv.reason}


@pytest.mark.skipif(backends.nvml_backend().available, reason="an NVML driver is present")
def test_unavailable_without_a_driver():
    nv = NvmlSampler()
    assert nv.reason == backends.nvml_backend().reason
    _check_inert(nv)


def test_unavailable_when_init_fails(fake_nvml):
    fake_nvml(init_fails=True)
    nv = NvmlSampler()
    assert "Driver Not Loaded" in nv.reason
    _check_inert(nv)


def test_sampling_and_energy_arithmetic(fake_nvml):
    fake = fake_nvml()
    syncs = []
    nv = NvmlSampler(device_index=0, interval_s=0.001, synchronize=lambda: syncs.append(1))
    assert nv.available
    with nv:
        assert nv.running and nv.device_name == "Fake GPU"
        _wait_for_samples(nv, 6)
        assert nv.mark_window(0) is None  # warm-up: restart the window, record nothing
        w1 = nv.mark_window(25)  # one counter read per boundary: 1 J since the last mark
        assert w1.energy_j == 1.0 and w1.joules_per_step == 0.04 and w1.warning is None
        w2 = nv.mark_window(5)
        assert w2.energy_j == 1.0 and str(MIN_WINDOW_STEPS) in w2.warning
        with nv.energy_window() as w3:
            w3.steps = 30  # may be set inside the block
        assert w3.energy_j == 1.0 and w3.seconds >= 0
    assert not nv.running and fake.shutdowns == fake.inits == 2  # backend probe + ours
    assert len(syncs) == 1 + 3 + 2  # start, three marks, two window boundaries

    n = len(nv.samples)
    time.sleep(0.02)
    assert len(nv.samples) == n  # the thread stopped

    s = nv.summary()
    mem = [x.memory_used for x in nv.samples]
    assert set(mem) <= {100 * MiB, 200 * MiB, 300 * MiB}
    assert s["samples"] == n and s["peak_memory_bytes"] == max(mem) == 300 * MiB
    assert s["mean_memory_bytes"] == pytest.approx(statistics.fmean(mem))
    assert s["mean_util_pct"] == 50 and s["mean_power_w"] == 250 and s["peak_power_w"] == 250
    assert s["energy_j"] == 3.0 and s["energy_steps"] == 60
    assert s["energy_per_step_j"] == pytest.approx(0.05)
    assert len(s["windows"]) == 3 and s["windows"][0]["joules_per_step"] == 0.04
    assert any("window 1" in w for w in s["warnings"])


def test_unsupported_fields_are_none(fake_nvml):
    fake_nvml(power=False, energy=False)
    with NvmlSampler(interval_s=0.001) as nv:
        _wait_for_samples(nv, 2)
        w = nv.mark_window(40)
    assert w.energy_j is None and "total-energy counter" in w.warning
    s = nv.summary()
    assert s["mean_power_w"] is None and s["energy_per_step_j"] is None
    assert s["peak_memory_bytes"] == 300 * MiB


def test_misuse_and_exceptions(fake_nvml):
    fake = fake_nvml()
    nv = NvmlSampler(interval_s=0.001)
    with pytest.raises(RuntimeError, match="not running"):
        nv.mark_window(20)
    with pytest.raises(ValueError, match="interval_s"):
        NvmlSampler(interval_s=0)
    with pytest.raises(KeyError):
        with nv:
            with nv.energy_window(steps=30):
                raise KeyError("step failed")
    assert not nv.running and fake.shutdowns == fake.inits == 2  # probe + ours, despite the error
    assert nv.windows == []  # an aborted window is not recorded
    with nv:
        with pytest.raises(ValueError, match="step count"):
            with nv.energy_window():
                pass  # steps never given


@pytest.mark.gpu
@pytest.mark.skipif(not backends.nvml_backend().available, reason="NVML unusable")
def test_real_device_sampling():
    import torch

    with NvmlSampler(interval_s=0.01) as nv:
        a = torch.randn(4096, 4096, device="cuda")
        with nv.energy_window(steps=MIN_WINDOW_STEPS) as w:
            for _ in range(MIN_WINDOW_STEPS):
                a = torch.tanh(a @ a)
    s = nv.summary()
    assert s["available"] and s["samples"] >= 2 and s["peak_memory_bytes"] > 0
    assert w.warning is None and w.energy_j is not None and w.energy_j > 0
    assert s["energy_per_step_j"] == pytest.approx(w.energy_j / MIN_WINDOW_STEPS)
