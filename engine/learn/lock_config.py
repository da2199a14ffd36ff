"""Settings of direction-lock learning (``learn-lock``): a typed dataclass, parsed strictly."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from freezeasguard.engine.errors import ConfigError
from freezeasguard.engine.learn.config import UserConfig

SIDES = ("out", "in", "both")
SELECTS = ("energy", "contrast")


@dataclass
class LockLearnConfig:
    base: str | None = None
    """Base model folder (a diffusers pipeline's layout: SD, SDXL, SD3 or Flux) whose directions are locked."""
    data: str = "digits"
    """'digits' or an image folder with metadata.jsonl and a `domain` per image."""
    illegal: list[str] = field(default_factory=list)
    """Illegal domain(s): the publisher's own split of what users must not learn."""
    innocent: list[str] = field(default_factory=list)
    """Innocent domain(s): needed by select='contrast' (and measured in the report either way)."""
    budget: float = 0.3
    """Share of each locked matrix's side (rows for 'out', columns for 'in') that is locked."""
    side: str = "out"
    """'out' (output directions, U), 'in' (input directions, V) or 'both' (half the budget each)."""
    rounds: int = 3
    """Fine-tunes: 1 = one-shot; each further round fine-tunes again under the lock so far."""
    select: str = "energy"
    """'energy': top singular directions of the illegal delta; 'contrast': directions with much
    illegal and little innocent update energy (generalised eigenvectors of the two covariances)."""
    contrast_ridge: float = 0.1
    """Ridge of the innocent covariance for 'contrast', as a share of its mean eigenvalue."""
    steps: int = 100
    """Steps of each round's fine-tune: the service's step cap."""
    user: UserConfig = field(default_factory=UserConfig)
    """Each round's fine-tune: the service's capped optimizer settings (lr, batch)."""
    mask: str | None = None
    """A freeze manifest whose tensor mask the lock is combined with (its frozen tensors stay
    frozen in the fine-tunes and are not locked); the output manifest carries both."""
    min_dim: int = 4
    """Matrices whose locked side is smaller than this are left unlocked."""
    seed: int = 0
    """Seed of every fine-tune (round k uses seed + k)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda[:i]'."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    progress: bool = True
    """Show progress bars."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "LockLearnConfig":
        u = self.user
        checks = [
            (0.0 < self.budget < 1.0, f"budget must be in (0, 1), got {self.budget}"),
            (self.side in SIDES, f"side must be one of {SIDES}, got {self.side!r}"),
            (self.select in SELECTS, f"select must be one of {SELECTS}, got {self.select!r}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.contrast_ridge > 0, "contrast_ridge must be > 0"),
            (u.lr > 0 and u.batch_size >= 1, "user.lr must be > 0 and user.batch_size >= 1"),
            (self.min_dim >= 1, "min_dim must be >= 1"),
            (not set(self.illegal) & set(self.innocent),
             f"domains {sorted(set(self.illegal) & set(self.innocent))} are both illegal and innocent"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError("invalid lock-learning config:\n  " + "\n  ".join(bad))
        return self
