"""The generator of a ``nnlab functa generate`` run: config, construction, sampling, save/load.

A :class:`Generator` wraps one of the three models (diffusion, flow, gaussian) with the
per-dimension standardisation of the training latents (:class:`nnlab.functa.classify.Normalizer`,
fitted on the train functaset and saved with the model): every model sees standardised latents,
and :meth:`Generator.sample` returns latents in the functaset's own units, ready for the SIREN.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nnlab.config import from_dict
from nnlab.engine.io import atomic_write
from nnlab.errors import CheckpointError, ConfigError
from nnlab.functa.classify import Normalizer
from nnlab.functa.generate.diffusion import Denoiser, Schedule, sample_ddim, sample_ddpm
from nnlab.functa.generate.flow import Flow
from nnlab.functa.generate.gaussian import GaussianModel

MODELS = ("diffusion", "flow", "gaussian")
SAMPLERS = ("ddim", "ddpm")


@dataclass
class GenerateConfig:
    """Options of ``nnlab functa generate`` (the CLI flags are built from these fields)."""

    model: str = "diffusion"           # diffusion | flow | gaussian
    conditional: bool = False          # class-conditional (needs a labelled functaset)
    steps: int = 10_000                # optimiser steps (diffusion, flow)
    time_limit_min: float = 0.0        # stop training after this many minutes (0 = no limit)
    batch_size: int = 256
    lr: float = 1e-3                   # AdamW, linear warm-up then cosine to 0 (over time when limited)
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0             # global-norm clipping (0 = off)
    ema_decay: float = 0.999           # sampled weights are an exponential moving average
    width: int = 384                   # diffusion: residual MLP width
    blocks: int = 3                    # diffusion: residual blocks
    timesteps: int = 1000              # diffusion: training timesteps T
    beta_schedule: str = "cosine"      # diffusion: cosine | linear
    p_uncond: float = 0.1              # diffusion: label dropout for classifier-free guidance
    guidance: float = 1.0              # diffusion: guidance w, eps = (1+w) eps_c - w eps_u (0 = none)
    sampler: str = "ddim"              # diffusion: ddim (fast, deterministic) | ddpm (full chain)
    sample_steps: int = 50             # diffusion: DDIM steps
    clip_x0: float = 5.0               # diffusion: clamp predicted x0 to +-this many std when sampling (0 = off)
    flow_layers: int = 8               # flow: ActNorm + invertible linear + coupling steps
    flow_hidden: int = 512             # flow: conditioner width
    samples: int = 10_000              # samples for FID, precision/recall and memorisation
    feature_epochs: int = 3            # training epochs of the FID feature network
    log_every: int = 50
    ckpt_every: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"unknown generative model {self.model!r}; use one of {', '.join(MODELS)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; use ddim or ddpm")
        if self.beta_schedule not in ("cosine", "linear"):
            raise ConfigError(f"unknown beta schedule {self.beta_schedule!r}; use cosine or linear")
        for name in ("steps", "batch_size", "width", "blocks", "flow_layers", "flow_hidden", "samples",
                     "sample_steps", "log_every", "ckpt_every", "feature_epochs"):  # 0 feature epochs: FID on noise
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.timesteps < 2:
            raise ConfigError(f"--timesteps must be at least 2, got {self.timesteps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr == self.lr and 0 < self.lr < float("inf")):  # lr 0 would train nothing
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("time_limit_min", "weight_decay", "grad_clip", "guidance", "p_uncond", "clip_x0"):
            v = getattr(self, name)
            if not (v == v and v >= 0 and v != float("inf")):
                flag = "time-limit" if name == "time_limit_min" else name.replace("_", "-")
                raise ConfigError(f"--{flag} must be a finite number >= 0, got {v}")
        for name in ("ema_decay", "p_uncond"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)}")

    # fields that only change sampling or evaluation: a resumed run may change them
    EVAL_FIELDS = ("guidance", "sampler", "sample_steps", "clip_x0", "samples", "steps", "time_limit_min", "log_every",
                   "ckpt_every")


@dataclass
class Generator:
    """A generative model over latents. net: Denoiser | Flow | GaussianModel; norm: the train
    latents' standardisation; num_classes: 0 when unconditional."""

    config: GenerateConfig
    net: nn.Module
    norm: Normalizer
    num_classes: int
    schedule: Schedule | None = None

    @property
    def dim(self) -> int:
        return len(self.norm.mean)

    def check_labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.num_classes == 0:
            if y is not None:
                raise ConfigError("this generator is unconditional; drop --class or train with --conditional")
            return None
        if y is None:  # classes in turn
            return torch.arange(n) % self.num_classes
        if ((y < 0) | (y >= self.num_classes)).any():
            raise ConfigError(f"class must be in 0..{self.num_classes - 1}")
        return y

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, seed: int = 0, batch: int = 2000) -> torch.Tensor:
        """n latents (n, D) in the functaset's units; y (n,) classes (conditional models; default
        classes in turn)."""
        y = self.check_labels(y, n)
        g = torch.Generator().manual_seed(seed)
        self.net.eval()
        parts = [self._sample_std(len(idx), None if y is None else y[idx], g)
                 for idx in torch.arange(n).split(batch)]
        return torch.cat(parts) * self.norm.std + self.norm.mean

    def _sample_std(self, n: int, y: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
        c = self.config
        if c.model == "gaussian":
            return self.net.sample(n, generator=g)
        if c.model == "flow":
            return self.net.sample(n, y, generator=g)
        if c.sampler == "ddpm":
            return sample_ddpm(self.net, self.schedule, n, self.dim, y, c.guidance, generator=g, clip=c.clip_x0)
        return sample_ddim(self.net, self.schedule, n, self.dim, c.sample_steps, y, c.guidance, generator=g,
                           clip=c.clip_x0)


def build_net(config: GenerateConfig, dim: int, num_classes: int) -> tuple[nn.Module, Schedule | None]:
    if config.model == "diffusion":
        sched = Schedule.make(config.beta_schedule, config.timesteps)
        return Denoiser(dim, config.width, config.blocks, num_classes, sched.alphas_bar), sched
    if config.model == "flow":
        return Flow(dim, config.flow_layers, config.flow_hidden, num_classes, seed=config.seed), None
    if num_classes:
        raise ConfigError("the gaussian baseline is unconditional; drop --conditional")
    return GaussianModel(dim), None


def save_generator(gen: Generator, path: str | Path) -> Path:
    """Final weights (the EMA for trained models) and the standardisation, as one safetensors file."""
    tensors = {f"net.{k}": v.detach().contiguous().cpu() for k, v in gen.net.state_dict().items()}
    tensors |= {"norm.mean": gen.norm.mean.contiguous(), "norm.std": gen.norm.std.contiguous()}
    meta = {"config": json.dumps(asdict(gen.config)), "num_classes": str(gen.num_classes), "dim": str(gen.dim)}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_generator(path: str | Path) -> Generator:
    """Read a file written by :func:`save_generator`; a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; train a generator with 'nnlab functa generate'")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path)
        config = from_dict(GenerateConfig, json.loads(meta["config"]))
        num_classes, dim = int(meta["num_classes"]), int(meta["dim"])
        net, sched = build_net(config, dim, num_classes)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        norm = Normalizer(tensors["norm.mean"], tensors["norm.std"])
    except Exception as exc:  # safetensors, json and load_state_dict raise several types
        raise CheckpointError(f"{path} is not a readable nnlab generator ({type(exc).__name__}: {exc}); "
                              "train it again with 'nnlab functa generate'") from None
    return Generator(config, net.eval(), norm, num_classes, sched)
