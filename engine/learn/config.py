"""Settings of mask learning: typed dataclasses with a docstring per field, parsed strictly.

Build one with ``config.resolve(MaskLearnConfig, file=..., overrides=[...], presets={})`` or
``config.from_dict``; unknown keys are errors naming the closest valid key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from freezeasguard.engine.config import TrainConfig
from freezeasguard.engine.errors import ConfigError

# Padding unit of the learner's flat buffers (learn.flat); here so that a config (and the CLI's check
# of one) needs no torch.
DEFAULT_CHUNK = 256


@dataclass
class UserConfig:
    """The simulated user: by default exactly the service's fine-tuning optimizer (AdamW)."""

    lr: float = TrainConfig.lr
    """AdamW learning rate of the simulated user."""
    batch_size: int = TrainConfig.batch_size
    """Global batch (illegal + innocent samples) of every step."""
    beta1: float = TrainConfig.beta1
    """AdamW beta1."""
    beta2: float = TrainConfig.beta2
    """AdamW beta2."""
    eps: float = TrainConfig.eps
    """AdamW epsilon."""
    weight_decay: float = TrainConfig.weight_decay
    """Decoupled weight decay on matrices/kernels (biases and norms get none), as the service."""
    max_grad_norm: float | None = TrainConfig.max_grad_norm
    """Global gradient-norm clipping of the user's gradient (None = off)."""


@dataclass
class MaskOptConfig:
    """The publisher's side: budget, relaxation and the logits' optimizer."""

    budget: float = 0.3
    """Freeze budget rho in [0, 1]; exported exactly by top-k over the logits."""
    budget_by: str = "params"
    """'params' or 'tensors': how rho and mean(m) count (params: mean weighted by tensor size)."""
    temperature: float = 0.2
    """T in m = sigmoid(x / T)."""
    optimizer: str = "adam"
    """Optimizer of the logits: 'adam' (scale-free, the default) or 'sgd' (the paper's)."""
    lr: float = 0.05
    """Learning rate of the logits."""
    penalty: float = 5e3
    """c, weight of the budget penalty (rho - mean(m))^2."""
    innocent_weight: float = 1.0
    """lambda, weight of L_innocent in the publisher's objective."""
    every: int = 5
    """One mask step every `every` batches; the others are simulated-user steps."""
    init_logit: float | None = None
    """Initial logit of every tensor; None = T * logit(budget), i.e. m = rho everywhere."""


@dataclass
class MaskLearnConfig:
    base: str | None = None
    """Base model folder (a diffusers pipeline's layout: SD, SDXL, SD3 or Flux) whose mask is learned."""
    data: str = "digits"
    """'digits' or an image folder with metadata.jsonl and a `domain` per image."""
    illegal: list[str] = field(default_factory=list)
    """Illegal domain(s): fine-tuning on them should converge badly."""
    innocent: list[str] = field(default_factory=list)
    """Innocent (legal) domain(s): fine-tuning on them should stay good."""
    innocent_weights: list[float] | None = None
    """Per-domain weights of the innocent loss (None = equal), in the order of `innocent`."""
    illegal_fraction: float = 0.5
    """Share of illegal samples in every batch."""
    steps: int = 2000
    """Total batches (simulated-user steps + mask steps)."""
    bootstrap_steps: int = 100
    """Steps of mixed illegal + innocent fine-tuning that give theta_ft (0 = start at theta_pre)."""
    finetuned: str | None = None
    """A fine-tuned model folder to use as theta_ft instead of bootstrapping."""
    seed: int = 0
    """Seed of data order, noise and timesteps (step-indexed: resume is bit-exact)."""
    user: UserConfig = field(default_factory=UserConfig)
    """The simulated user's optimizer."""
    mask: MaskOptConfig = field(default_factory=MaskOptConfig)
    """The mask's objective and optimizer."""
    chunk: int = DEFAULT_CHUNK
    """Alignment of tensors in the flat buffers (elements)."""
    mixed_precision: str = "fp32"
    """'fp32' or 'bf16' (autocast for forward/backward; the flat buffers stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's block activations in backward."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda[:i]'."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    progress: bool = True
    """Show a progress bar."""
    log_every: int = 1
    """Write a JSONL row every N steps."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0 = never)."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints (each holds five model-sized fp32 buffers)."""
    work_dir: str | None = None
    """Where log.jsonl, checkpoints and the bootstrap model go (None: nothing is written)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "MaskLearnConfig":
        u, m = self.user, self.mask
        checks = [
            (0.0 <= m.budget <= 1.0, f"mask.budget must be in [0, 1], got {m.budget}"),
            (m.budget_by in ("params", "tensors"), f"mask.budget_by must be 'params' or 'tensors', got {m.budget_by!r}"),
            (m.temperature > 0, "mask.temperature must be > 0"),
            (m.optimizer in ("adam", "sgd"), f"mask.optimizer must be 'adam' or 'sgd', got {m.optimizer!r}"),
            (m.lr > 0, "mask.lr must be > 0"),
            (m.penalty >= 0, "mask.penalty must be >= 0"),
            (m.every >= 2, "mask.every must be >= 2 (one mask step, at least one user step)"),
            (u.lr > 0, "user.lr must be > 0"),
            (u.batch_size >= 2, "user.batch_size must be >= 2 (illegal and innocent samples)"),
            (0.0 <= u.beta1 < 1.0 and 0.0 <= u.beta2 < 1.0, "user.beta1/beta2 must be in [0, 1)"),
            (u.max_grad_norm is None or u.max_grad_norm > 0, "user.max_grad_norm must be > 0"),
            (0.0 < self.illegal_fraction < 1.0, "illegal_fraction must be in (0, 1)"),
            (self.steps >= 0 and self.bootstrap_steps >= 0, "steps and bootstrap_steps must be >= 0"),
            (self.chunk >= 1, "chunk must be >= 1"),
            (self.mixed_precision in ("fp32", "bf16"), "mixed_precision must be 'fp32' or 'bf16'"),
            (self.log_every >= 1 and self.checkpoint_every >= 0 and self.keep_checkpoints >= 1,
             "log_every and keep_checkpoints must be >= 1, checkpoint_every >= 0"),
            (not set(self.illegal) & set(self.innocent),
             f"domains {sorted(set(self.illegal) & set(self.innocent))} are both illegal and innocent"),
            (self.innocent_weights is None or (len(self.innocent_weights) == len(self.innocent)
                                               and all(w > 0 for w in self.innocent_weights)),
             "innocent_weights must hold one positive weight per innocent domain"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError("invalid mask-learning config:\n  " + "\n  ".join(bad))
        b = u.batch_size
        n_ill = round(b * self.illegal_fraction)
        if not 1 <= n_ill <= b - 1:
            raise ConfigError(f"user.batch_size {b} x illegal_fraction {self.illegal_fraction} leaves no "
                              "illegal or no innocent sample per batch")
        return self

    @property
    def illegal_per_batch(self) -> int:
        return round(self.user.batch_size * self.illegal_fraction)
