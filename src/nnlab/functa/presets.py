"""Named functa presets: a model config plus meta-training settings.

``mnist-cpu`` is tuned for 2 CPU cores (narrow and shallow SIREN, Meta-SGD, larger outer rate);
``mnist-10min-64`` and ``mnist-10min-256`` are the recipes that meet issue 17's 10-minute targets
(their runs' ``config.yaml`` in ``docs/results/functa-mnist-10min`` are tested against them);
``mnist-seed`` and ``celeba64-paper`` are the seed report's and the functa paper's settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from nnlab.errors import ConfigError
from nnlab.functa.model import FunctaConfig


# the CLI flags whose names are not the field's (errors name the flag the user typed)
FLAGS = {"time_limit_min": "--time-limit", "use_checkpoint": "--checkpointing"}


@dataclass
class MetaTrainConfig:
    """Meta-training settings (the outer loop)."""

    steps: int = 2000                  # outer (meta) steps
    batch_size: int = 32               # images per meta-step and process (under torchrun: times the processes)
    inner_steps: int = 3               # SGD steps that fit each latent
    outer_lr: float = 1e-3             # Adam learning rate of the shared weights
    weight_decay: float = 0.0          # Adam weight decay of the shared weights
    meta_lr_mult: float = 1.0          # outer learning-rate multiplier for the Meta-SGD rates
    hidden_lr_mult: float = 1.0        # outer learning-rate multiplier for the hidden sine layers' weights
                                       # (< 1 keeps them from growing into a collapse; see trainer)
    grad_clip: float = 0.0             # clip the meta-gradient's global norm (0 = off)
    schedule: str = "constant"         # constant, or cosine: decay to 0 over the time limit (else over steps)
    chunk: int = 8                     # max images per forward/backward (cache-sized, grads accumulate)
                                       # (a smaller batch is split evenly over the workers)
    workers: int = 0                   # threads running chunks, 1 torch thread each (0 = torch's count)
    first_order: bool = False          # first-order meta-gradients (inner gradients as constants)
    use_checkpoint: bool = False       # recompute the inner steps in the backward pass (saves memory)
    compile: bool = False              # torch.compile each chunk's meta-loss (fused loops; falls back to eager)
    time_limit_min: float = 0.0        # stop meta-training after this many minutes (0 = no limit)
    log_every: int = 20                # steps between metrics lines
    val_every: int = 200               # steps between validation PSNRs
    val_images: int = 500               # held out from the end of the train split
    ckpt_every: int = 100              # steps between checkpoints
    eval_batch: int = 100               # images per batch when fitting the test split
    collapse_db: float = 6.0           # val PSNR this far below the best: roll back, halve the lr (0 = off)
    max_rollbacks: int = 3             # collapse roll-backs before stopping with a DivergenceError
    seed: int = 0                      # initialisation and batch order

    def validate(self) -> "MetaTrainConfig":
        """A one-line ConfigError naming the first bad setting and its valid range; returns self."""
        import math

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        checks = [("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("inner_steps", self.inner_steps >= 0, ">= 0"),
                  ("outer_lr", finite(self.outer_lr) and self.outer_lr > 0, "a positive finite number"),
                  ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
                  ("meta_lr_mult", finite(self.meta_lr_mult) and self.meta_lr_mult > 0, "a positive finite number"),
                  ("hidden_lr_mult", finite(self.hidden_lr_mult) and self.hidden_lr_mult > 0,
                   "a positive finite number"),
                  ("grad_clip", finite(self.grad_clip) and self.grad_clip >= 0, ">= 0 (0 = off)"),
                  ("schedule", self.schedule in ("constant", "cosine"), "constant or cosine"),
                  ("chunk", self.chunk >= 1, ">= 1"), ("workers", self.workers >= 0, ">= 0"),
                  ("time_limit_min", finite(self.time_limit_min) and self.time_limit_min >= 0, ">= 0"),
                  ("log_every", self.log_every >= 1, ">= 1"), ("val_every", self.val_every >= 1, ">= 1"),
                  ("val_images", self.val_images >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
                  ("eval_batch", self.eval_batch >= 1, ">= 1"), ("collapse_db", finite(self.collapse_db)
                                                                  and self.collapse_db >= 0, ">= 0 (0 = off)"),
                  ("max_rollbacks", self.max_rollbacks >= 0, ">= 0"),
                  ("compile", not (self.compile and self.use_checkpoint), "off with --checkpointing (pick one)")]
        for name, ok, want in checks:
            if not ok:
                flag = FLAGS.get(name, "--" + name.replace("_", "-"))
                raise ConfigError(f"{flag} must be {want}, got {getattr(self, name)!r}")
        return self


@dataclass
class Preset:
    model: FunctaConfig
    train: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    description: str = ""


# Issue 17's 10-minute recipes (docs/results/functa-mnist-10min, runs *-s24): mnist-cpu with a deeper SIREN,
# FiLM scales, per-step Meta-SGD rates, batch 16 and a slower-learning hidden stack; 2 CPU cores.
_TEN_MIN_MODEL = FunctaConfig(width=64, depth=5, modulate_scale=True, meta_sgd=True, meta_sgd_steps=3)
_TEN_MIN_TRAIN = MetaTrainConfig(steps=100_000, batch_size=16, grad_clip=1.0, meta_lr_mult=10.0, schedule="cosine",
                                 time_limit_min=10.0)

PRESETS: dict[str, Preset] = {
    "mnist-cpu": Preset(
        FunctaConfig(width=64, depth=4, w0=30.0, latent_dim=256, meta_sgd=True),
        MetaTrainConfig(steps=100_000, batch_size=32, outer_lr=1e-3, grad_clip=1.0, meta_lr_mult=10.0,
                        schedule="cosine"),
        "small SIREN for 2 CPU cores: width 64, 3 sine layers, latent 256, Meta-SGD"),
    "mnist-10min-64": Preset(
        replace(_TEN_MIN_MODEL, w0=20.0, latent_dim=64), replace(_TEN_MIN_TRAIN, outer_lr=1.5e-3, hidden_lr_mult=0.5),
        "latent 64 in 10 minutes on 2 CPU cores: 28.0 dB test PSNR on MNIST (width 64, 4 sine layers, w0 20)"),
    "mnist-10min-256": Preset(
        replace(_TEN_MIN_MODEL, w0=30.0, latent_dim=256), replace(_TEN_MIN_TRAIN, outer_lr=1e-3, hidden_lr_mult=0.25),
        "latent 256 in 10 minutes on 2 CPU cores: 31.1-31.3 dB test PSNR on MNIST (width 64, 4 sine layers)"),
    "tiny": Preset(
        FunctaConfig(width=16, depth=3, w0=30.0, latent_dim=16, meta_sgd=True),
        MetaTrainConfig(steps=20, batch_size=8, outer_lr=1e-3, log_every=2, val_every=4, val_images=16,
                        ckpt_every=2, eval_batch=250),
        "tiny grey model for tests and smoke runs (seconds)"),
    "mnist-seed": Preset(
        FunctaConfig(width=512, depth=16, w0=30.0, latent_dim=128, inner_lr=1e-2),
        MetaTrainConfig(steps=100_000, batch_size=4, outer_lr=3e-6, weight_decay=1e-4),
        "seed report: 15 hidden layers of 512, shift-only, latent 128, SGD 1e-2, batch 4, Adam 3e-6"),
    "celeba64-cpu": Preset(
        FunctaConfig(width=128, depth=4, w0=30.0, out_channels=3, latent_dim=256, meta_sgd=True),
        MetaTrainConfig(steps=100_000, batch_size=8, outer_lr=1e-3, grad_clip=1.0, val_images=200,
                        val_every=100, eval_batch=50),
        "faces at 64x64 on CPU: width 128, 3 sine layers, latent 256, Meta-SGD"),
    "celeba64-paper": Preset(
        FunctaConfig(width=512, depth=15, w0=30.0, out_channels=3, latent_dim=256, meta_sgd=True),
        MetaTrainConfig(steps=500_000, batch_size=16, outer_lr=3e-6),
        "functa paper: width 512, depth 15, w0 30, shift-only, Meta-SGD, 3 steps, Adam 3e-6, batch 16"),
}


def get_preset(name: str, *, latent_dim: int | None = None, steps: int | None = None,
               model_overrides: dict | None = None, **train_overrides) -> Preset:
    """Preset ``name`` with optional overrides (``None`` keeps the preset's value); ``model_overrides``
    are :class:`FunctaConfig` fields (width, depth, w0, meta_sgd, inner_lr, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown functa preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    arch = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    if latent_dim is not None:
        arch["latent_dim"] = latent_dim
    bad_arch = sorted(set(arch) - set(FunctaConfig.__dataclass_fields__))
    if bad_arch:
        raise ConfigError(f"unknown functa model option(s) {bad_arch}")
    model = replace(p.model, **arch)
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    if steps is not None:
        overrides["steps"] = steps
    bad = sorted(set(overrides) - set(MetaTrainConfig.__dataclass_fields__))
    if bad:
        raise ConfigError(f"unknown functa training option(s) {bad}")
    return Preset(model, replace(p.train, **overrides), p.description)
