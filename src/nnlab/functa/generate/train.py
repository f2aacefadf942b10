"""Training a generator on a train functaset: checkpointed, resumable, time-limited.

``GEN/checkpoint/`` holds the live weights and their EMA (safetensors) and the optimiser, step,
elapsed time and both random states (``weights_only`` state file), so a killed run resumed with
``--resume`` continues bit for bit. Batches come from a per-epoch permutation seeded by
``(seed, epoch)``; the timestep, noise and label-dropout draws from one checkpointed generator.
The gaussian baseline has nothing to train: it is fitted in one pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nnlab.engine.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.runs import RunDir
from nnlab.errors import CheckpointError, DivergenceError
from nnlab.functa.classify import Normalizer
from nnlab.functa.generate.diffusion import diffusion_loss
from nnlab.functa.generate.model import GenerateConfig, Generator, build_net


@dataclass
class TrainState:
    gen: Generator
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer | None
    rng: torch.Generator
    step: int = 0
    elapsed: float = 0.0


def lr_factor(cfg: GenerateConfig, step: int, elapsed: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to 0 over the time limit (when set) or steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = elapsed / (60 * cfg.time_limit_min) if cfg.time_limit_min > 0 else step / cfg.steps
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _loss(state: TrainState, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    g = state.gen
    if g.config.model == "diffusion":
        return diffusion_loss(g.net, g.schedule, x, y, g.config.p_uncond, state.rng)
    return -g.net.log_prob(x, y).mean() / g.dim  # nats per dimension


@torch.no_grad()
def _update_ema(state: TrainState) -> None:
    decay = min(state.gen.config.ema_decay, (1 + state.step) / (10 + state.step))
    for name, value in state.gen.net.state_dict().items():
        if value.is_floating_point():
            state.ema[name].mul_(decay).add_(value, alpha=1 - decay)
        else:
            state.ema[name].copy_(value)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor | None) -> float:
    """One AdamW step on standardised latents x (B, D); returns the loss (DivergenceError on NaN)."""
    cfg = state.gen.config
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, state.step, state.elapsed)
    state.gen.net.train()
    loss = _loss(state, x, y)
    if not torch.isfinite(loss):
        raise DivergenceError(f"generator training diverged at step {state.step + 1} (loss {loss.item()}); "
                              "start again with a lower --lr")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.gen.net.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.step += 1
    _update_ema(state)
    return loss.item()


def new_state(cfg: GenerateConfig, train_latents: torch.Tensor, num_classes: int) -> TrainState:
    torch.manual_seed(cfg.seed)
    net, sched = build_net(cfg, train_latents.shape[1], num_classes)
    gen = Generator(cfg, net, Normalizer.fit(train_latents), num_classes, sched)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return TrainState(gen, ema, opt, torch.Generator().manual_seed(cfg.seed + 1))


def save_state(state: TrainState, run: RunDir) -> None:
    tensors = {f"net.{k}": v for k, v in state.gen.net.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in state.ema.items()}
    save_checkpoint(run.checkpoint_dir, state.step, tensors,
                    {"optimizer": state.optimizer.state_dict(), "elapsed": state.elapsed,
                     "rng": state.rng.get_state()})


def load_state(state: TrainState, run: RunDir) -> None:
    ckpt = load_checkpoint(run.checkpoint_dir)
    try:
        state.gen.net.load_state_dict({k[4:]: v for k, v in ckpt.tensors.items() if k.startswith("net.")})
        state.ema = {k[4:]: v for k, v in ckpt.tensors.items() if k.startswith("ema.")}
        state.optimizer.load_state_dict(ckpt.state["optimizer"])
        state.rng.set_state(ckpt.state["rng"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint in {run.checkpoint_dir} does not match this generator ({exc}); "
                              "use the run's own options or a new --out") from None
    state.step, state.elapsed = ckpt.step, float(ckpt.state["elapsed"])


def _batches(cfg: GenerateConfig, n: int, step: int):
    """Endless index batches (B,) continuing from global step ``step``."""
    per_epoch = max(n // cfg.batch_size, 1)
    epoch, start = divmod(step, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for i in range(start, per_epoch):
            yield perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        epoch, start = epoch + 1, 0


def train(state: TrainState, x: torch.Tensor, y: torch.Tensor | None, run: RunDir, log: MetricsLogger,
          progress: bool = True) -> None:
    """Train until ``steps`` or the time limit; x (N, D) standardised latents, y (N,) or None."""
    cfg = state.gen.config
    if cfg.model == "gaussian":
        state.gen.net.fit(x)
        state.ema = {k: v.clone() for k, v in state.gen.net.state_dict().items()}
        return
    limit = cfg.time_limit_min * 60 if cfg.time_limit_min > 0 else float("inf")
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.model}", disable=None if progress else True)
    batches, window = _batches(cfg, len(x), state.step), []
    while state.step < cfg.steps and state.elapsed < limit:
        t0 = time.perf_counter()
        idx = next(batches)
        window.append(train_step(state, x[idx], None if y is None else y[idx]))
        state.elapsed += time.perf_counter() - t0
        bar.update(1)
        if state.step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            log.log({"step": state.step, "minutes": state.elapsed / 60, "loss": sum(window) / len(window),
                     "lr": state.optimizer.param_groups[0]["lr"]})
            window.clear()
        if state.step % cfg.ckpt_every == 0:
            save_state(state, run)
    bar.close()
    save_state(state, run)


def resume_or_new(cfg: GenerateConfig, x_raw: torch.Tensor, num_classes: int, run: RunDir,
                  resume: bool) -> TrainState:
    state = new_state(cfg, x_raw, num_classes)
    if resume and has_checkpoint(run.checkpoint_dir) and cfg.model != "gaussian":
        load_state(state, run)
    return state


def ema_generator(state: TrainState) -> Generator:
    """The generator with the EMA weights loaded (what is sampled and saved)."""
    state.gen.net.load_state_dict(state.ema)
    return state.gen
