"""Small builders shared by the tests."""
from __future__ import annotations

from freezeasguard.engine.config import resolve
from freezeasguard.engine.model.data import digits_dataset


def tiny_config(out_dir, *overrides: str):
    base = [f"out_dir={out_dir}", "train.progress=false", "train.steps=4", "train.batch_size=8",
            "train.num_threads=1"]
    return resolve(preset="tiny", overrides=[*base, *overrides])


def tiny_digits(classes=(0, 1), resolution: int = 16):
    return digits_dataset(resolution, classes=classes)


def record_grads(trainer) -> list:
    """Make ``trainer`` record the (clipped) gradients it hands the optimizer at every step."""
    seen: list = []
    step = trainer.optimizer.step

    def recording_step(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in trainer.named_trainable})
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    return seen
