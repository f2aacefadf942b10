"""Meta-training of a :class:`LatentModulatedSiren` on an image data set.

``RUN/`` holds config.yaml, metrics.jsonl (train PSNR every ``log_every`` steps, validation PSNR
on images held out from the train split every ``val_every``), checkpoint/ (atomic, resumable) and
summary.json with ``test_psnr``: the mean per-image PSNR (dB, data in [0, 1], reconstruction
clamped to [0, 1]) over the whole test split after the inner steps.

Long runs at a high outer learning rate can collapse without a NaN: the shared network stops
fitting and the inner loop no longer lowers the error. :class:`CollapseGuard` watches the
validation PSNR and rolls such a run back to its best validation step with half the learning rate.
What grows before such a collapse (``mnist-cpu``, outer lr 1.5e-3, measured) is the hidden sine
layers' weights: their norm goes from 0.38 at the SIREN initialisation to about 1 by step 600 and
to 1.7-2 as the training PSNR falls from 19 to 10 dB. Adam moves each weight by about the learning
rate a step, and a hidden weight starts below sqrt(6 / width) / w0 (0.01 at width 64, against 0.5
in the first layer), so a step of 1e-3 is a tenth of it; ``hidden_lr_mult`` < 1 gives the hidden
layers' weights a smaller rate of their own.

Under ``torchrun`` (``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m nnlab functa train ...``)
each process meta-trains on its own batch of ``batch_size`` images (so the batch of a step is
``batch_size`` times the processes), the meta-gradients are averaged in one all-reduce, and the
ranks share one clock (the slowest rank's elapsed time), so a ``--time-limit`` run stops at the same
step on every rank and the time-based cosine schedule gives every rank the same learning rate. On 2
cores it is no faster than one process with two worker threads (10 minutes at batch 16: 4,170
meta-steps as 2 x 8 against 4,505; BENCHMARKS.md, issue 17).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nnlab.data import BatchLoader, ImageSet, load_dataset
from nnlab.engine import distributed as dist
from nnlab.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.runs import RunDir, check_out
from nnlab.engine.trained import save_final_weights
from nnlab.errors import CheckpointError, ConfigError, DivergenceError
from nnlab.functa import meta
from nnlab.functa.functaset import fit_images
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren
from nnlab.functa.parallel import ChunkRunner, chunk_runner
from nnlab.functa.presets import MetaTrainConfig, Preset


@dataclass
class TrainState:
    model: LatentModulatedSiren
    optimizer: torch.optim.Optimizer
    step: int = 0
    elapsed: float = 0.0        # seconds of meta-training so far (over resumes)
    compiled: meta.CompiledMetaLoss | None = None  # with --compile: made by the first step
    compile_failed: bool = False  # --compile could not build: the steps run eagerly


def check_data(model_cfg: FunctaConfig, shape: tuple[int, ...], name: str) -> None:
    if shape[0] != model_cfg.out_channels:
        raise ConfigError(f"data set {name} has {shape[0]} channel(s) but the model outputs "
                          f"{model_cfg.out_channels}; pick a preset for this data set")


def build_state(preset: Preset, device: torch.device) -> TrainState:
    torch.manual_seed(preset.train.seed)
    model = LatentModulatedSiren(preset.model).to(device)
    cfg = preset.train
    named = dict(model.named_parameters())
    rates = [named.pop("meta_lr")] if "meta_lr" in named else []
    # hidden sine layers' weights (about 0.01 at init): their own rate, else with the rest
    hidden = [named.pop(n) for n in list(named) if n.startswith("hidden.") and n.endswith(".weight")] \
        if cfg.hidden_lr_mult != 1.0 else []
    groups = [{"params": list(named.values())}]
    if hidden:
        groups.append({"params": hidden, "lr": cfg.outer_lr * cfg.hidden_lr_mult})
    if rates:  # no weight decay on the learning rates
        groups.append({"params": rates, "lr": cfg.outer_lr * cfg.meta_lr_mult, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.outer_lr, weight_decay=cfg.weight_decay)
    return TrainState(model, opt)


def resume_state(state: TrainState, folder: Path) -> None:
    ckpt = load_checkpoint(folder)
    try:
        state.model.load_state_dict(ckpt.tensors)
        state.optimizer.load_state_dict(ckpt.state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint in {folder} does not match this preset ({exc}); "
                              "use the run's own preset or a new --out") from None
    state.step, state.elapsed = ckpt.step, float(ckpt.state["elapsed"])
    set_rng_state(ckpt.state["rng"])


def save_state(state: TrainState, run: RunDir) -> None:
    if dist.is_main():
        save_checkpoint(run.checkpoint_dir, state.step, state.model.state_dict(),
                        {"optimizer": state.optimizer.state_dict(), "elapsed": state.elapsed,
                         "rng": rng_state()})


def meta_step(state: TrainState, x: torch.Tensor, cfg: MetaTrainConfig,
              runner: ChunkRunner | None = None) -> meta.MetaStepResult:
    """One outer Adam step on a batch x (B, C, H, W) in [0, 1]; DivergenceError on NaN/inf.

    The batch runs in chunks of at most ``cfg.chunk`` images (on ``runner``'s threads), and in at
    least as many chunks as the runner has workers, so that a small batch (celeba64-cpu's 8) keeps
    every core busy; each chunk's backward adds its share of the batch-mean meta-gradient, so the
    result equals one big batch.
    With ``cfg.compile`` the chunks run :class:`meta.CompiledMetaLoss`; its first step runs on this
    thread (compiling once), and a compile failure falls back to eager steps with one warning.
    """
    state.optimizer.zero_grad(set_to_none=True)

    def chunk(xc: torch.Tensor) -> meta.MetaStepResult:
        if cfg.compile and state.compiled is not None:
            res = state.compiled(state.model, xc)
        else:
            res = meta.meta_loss(state.model, xc, cfg.inner_steps, first_order=cfg.first_order,
                                 use_checkpoint=cfg.use_checkpoint)
        if not torch.isfinite(res.loss):
            raise DivergenceError(f"meta-training diverged at step {state.step + 1} (loss {res.loss.item()}); "
                                  "lower --outer-lr or resume from the last checkpoint")
        (res.loss * (len(xc) / len(x))).backward()
        return res

    chunks, parts = x.split(chunk_size(len(x), cfg.chunk, runner.workers if runner else 1)), None
    if cfg.compile and state.compiled is None and not state.compile_failed:
        parts = _first_compiled_step(state, cfg, chunk, chunks)  # None: it could not compile
    if parts is None:
        parts = (runner or ChunkRunner(1)).map(chunk, chunks)
    dist.all_reduce_mean_flat([p.grad for p in state.model.parameters() if p.grad is not None])
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.step += 1
    loss = sum(r.loss.detach() * len(r.psnr) for r in parts) / len(x)
    return meta.MetaStepResult(loss, torch.cat([r.psnr for r in parts]), torch.cat([r.inner_mse for r in parts]))


def chunk_size(batch: int, chunk: int, workers: int) -> int:
    """Images per chunk: at most ``chunk``, and small enough for ``batch`` to give every one of
    ``workers`` threads a chunk (8 images on 2 workers: chunks of 4, not one chunk of 8)."""
    return max(1, min(chunk, -(-batch // max(workers, 1))))


def _first_compiled_step(state, cfg, chunk, chunks) -> list[meta.MetaStepResult] | None:
    """The chunks of the first compiled step, in order on this thread (two threads must not compile
    at once); None after a compile failure (no C++ compiler, an unsupported op), with one warning
    and the gradients cleared, so that the caller reruns the step eagerly."""
    import warnings

    state.compiled = meta.CompiledMetaLoss(cfg.inner_steps, cfg.first_order)
    try:
        return [chunk(xc) for xc in chunks]
    except DivergenceError:
        raise
    except Exception as err:  # torch.compile's failures have many types (BackendCompilerFailed, ...)
        warnings.warn(f"functa --compile unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "meta-training runs eagerly", RuntimeWarning, stacklevel=3)
        state.compiled, state.compile_failed = None, True
        state.optimizer.zero_grad(set_to_none=True)
        return None


def evaluate_psnr(model: LatentModulatedSiren, images: torch.Tensor, steps: int, batch: int,
                  workers: int = 0, runner: ChunkRunner | None = None) -> dict:
    """Mean per-image PSNR (dB) and inner MSE of uint8 images (N, C, H, W) after ``steps``."""
    r = fit_images(model, images, steps, batch_size=batch, progress=False, workers=workers, runner=runner)
    return {"psnr": r.psnr.mean().item(), "psnr_std": r.psnr.std().item() if len(r.psnr) > 1 else 0.0,
            "mse": r.mse.mean().item()}


def _loader(train: ImageSet, cfg: MetaTrainConfig) -> BatchLoader:
    return BatchLoader(train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                       rank=dist.rank(), world_size=dist.world_size())


def _batches(loader: BatchLoader, step: int):
    """Endless batches continuing from global step ``step`` (resume lands on the same batch)."""
    per_epoch = len(loader)
    epoch, start = divmod(step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for x, _ in loader.iter_from(start):
            yield x
        epoch, start = epoch + 1, 0


def train_functa(preset: Preset, data: str, out: str | Path, *, data_dir: str | Path | None = None,
                 resume: bool = False, device: str = "auto", progress: bool = True) -> dict:
    """Meta-train ``preset`` on data set ``data``; returns (and writes) the summary dict. The run
    folder is locked while it trains (a second process writing it is refused)."""
    preset.train.validate()
    info = dist.init_from_env(device)
    run = RunDir(check_out(out), create=False)
    splits = load_dataset(data, data_dir)  # before the lock: a bad data set leaves no run folder
    check_data(preset.model, splits.shape, data)
    if len(splits.train) <= preset.train.val_images + preset.train.batch_size:
        raise ConfigError(f"{data} has {len(splits.train)} train images; need more than val_images + batch_size")
    with run.lock() if dist.is_main() else nullcontext():
        return _train_functa(preset, data, splits, run, info, resume, progress)


def _train_functa(preset: Preset, data: str, splits, run: RunDir, info, resume: bool, progress: bool) -> dict:
    cfg = preset.train
    train = splits.train.subset(slice(0, len(splits.train) - cfg.val_images))
    val = splits.train.images[len(splits.train) - cfg.val_images:]
    state = build_state(preset, info.device)
    if not resume and has_checkpoint(run.checkpoint_dir):  # never train over a run a kill left behind
        raise CheckpointError(f"{run.path} already holds a functa run with a checkpoint; pass --resume to continue "
                              "it, or choose a new --out folder")
    if resume and has_checkpoint(run.checkpoint_dir):
        check_resume_config(run, preset, data)
        resume_state(state, run.checkpoint_dir)
    elif dist.is_main():
        run.save_config({"model": asdict(preset.model), "train": asdict(cfg), "data": data})
    log = MetricsLogger(run.metrics_path, resume_step=state.step if resume else None) if dist.is_main() else None
    with chunk_runner(cfg.workers if info.device.type == "cpu" else 1) as runner:
        _meta_train(state, cfg, _loader(train, cfg), val, log, run, runner, progress)
    test = evaluate_psnr(state.model, splits.test.images, cfg.inner_steps, cfg.eval_batch, cfg.workers)
    summary = {"test_psnr": test["psnr"], "test_psnr_std": test["psnr_std"], "test_mse": test["mse"],
               "test_images": len(splits.test), "steps": state.step, "train_minutes": state.elapsed / 60,
               "data": data, "latent_dim": preset.model.latent_dim, "inner_steps": cfg.inner_steps,
               "world_size": dist.world_size()}
    if log is not None:
        log.log({"step": state.step, "test_psnr": test["psnr"]})
        log.close()
        save_final_weights(state.model, run)
        run.write_summary(summary)
    return summary


# meta-training options a resumed run may change: its length and its bookkeeping
RESUMABLE = ("steps", "time_limit_min", "log_every", "val_every", "ckpt_every", "eval_batch", "workers", "compile")


def check_resume_config(run: RunDir, preset: Preset, data: str) -> None:
    """Refuse ``--resume`` with another model, data set or meta-training setting than the run's
    (its length and logging may change); a ConfigError names each difference."""
    old = run.load_config()
    new = {"model": asdict(preset.model), "train": asdict(preset.train), "data": data}
    diffs = [f"data {old.get('data')} -> {data}"] if old.get("data") != data else []
    for section in ("model", "train"):
        saved = old.get(section, {})
        for key, value in new[section].items():
            if section == "train" and key in RESUMABLE:
                continue
            was = saved.get(key)
            if isinstance(value, (list, tuple)):
                value, was = list(value), list(was) if isinstance(was, (list, tuple)) else was
            if key in saved and was != value:
                diffs.append(f"{key} {was} -> {value}")
    if diffs:
        raise ConfigError(f"--resume with a changed configuration ({'; '.join(diffs)}) in {run.path}; drop "
                          "those options to continue the run as it was, or use a new --out")


def schedule_factor(cfg: MetaTrainConfig, step: int, elapsed: float) -> float:
    """Outer learning-rate factor: 1 (constant), or cosine from 1 to 0 over the time limit when one
    is set (a function of the meta-training time, so resumes continue the same curve), else over steps."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ConfigError(f"unknown functa schedule {cfg.schedule!r}; use constant or cosine")
    frac = elapsed / (60 * cfg.time_limit_min) if cfg.time_limit_min > 0 else step / max(cfg.steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _set_lr(state: TrainState, cfg: MetaTrainConfig) -> float:
    factor = schedule_factor(cfg, state.step, state.elapsed)
    for group in state.optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor
    return factor


@dataclass
class Snapshot:
    """The training state at a validation step, kept in memory to roll back to."""
    step: int
    psnr: float
    model: dict
    optimizer: dict
    rng: dict


class CollapseGuard:
    """Rolls a collapsed run back (see the module docstring).

    ``check`` after each validation: a new best PSNR is snapshotted; a PSNR more than
    ``cfg.collapse_db`` below the best restores the best snapshot (weights, optimiser, random
    state, step) with the outer learning rate halved, ``cfg.max_rollbacks`` times at most, then
    raises a :class:`DivergenceError`. The snapshot lives in memory, from this process's start.
    Every process validates the same images, so all DDP ranks decide alike. Time spent before a
    rollback still counts towards ``time_limit_min``.
    """

    def __init__(self, cfg: MetaTrainConfig):
        self.cfg, self.best, self.rollbacks = cfg, None, 0

    def check(self, state: TrainState, psnr: float) -> Snapshot | None:
        """Return the snapshot rolled back to, or None when training goes on as it is."""
        if self.best is None or psnr > self.best.psnr:
            self.best = Snapshot(state.step, psnr, {k: v.clone() for k, v in state.model.state_dict().items()},
                                 copy.deepcopy(state.optimizer.state_dict()), rng_state())
            return None
        if self.cfg.collapse_db <= 0 or psnr >= self.best.psnr - self.cfg.collapse_db:
            return None
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise DivergenceError(
                f"meta-training collapsed at step {state.step}: validation PSNR {psnr:.2f} dB against the best "
                f"{self.best.psnr:.2f} dB at step {self.best.step}, after {self.rollbacks} rollback(s) with a "
                "halved learning rate each; start again with a lower --outer-lr")
        self.rollbacks += 1
        b = self.best
        for group in b.optimizer["param_groups"]:
            group["base_lr"] = group.get("base_lr", group["lr"]) * 0.5
        state.model.load_state_dict(b.model)
        state.optimizer.load_state_dict(copy.deepcopy(b.optimizer))  # the snapshot may be needed again
        set_rng_state(b.rng)
        state.step = b.step
        return b


def _validate(state, cfg, val, log, run, guard, runner) -> bool:
    """Validation PSNR, logged; True when the guard rolled the run back (checkpoint rewritten)."""
    v = evaluate_psnr(state.model, val, cfg.inner_steps, cfg.eval_batch, runner=runner)
    at, back = state.step, guard.check(state, v["psnr"])
    if back is None:
        if log is not None:
            log.log({"step": at, "minutes": state.elapsed / 60, "val_psnr": v["psnr"]})
        return False
    tqdm.write(f"meta-training collapsed at step {at} (validation PSNR {v['psnr']:.2f} dB, best "
               f"{back.psnr:.2f} dB): rolled back to step {back.step} with half the outer learning rate")
    if log is not None:
        log.truncate(back.step)
        log.log({"step": back.step, "rollback_from": at, "collapsed_val_psnr": v["psnr"],
                 "best_val_psnr": back.psnr, "lr_factor": 0.5 ** guard.rollbacks})
    save_state(state, run)  # also deletes the checkpoints after back.step
    return True


def _meta_train(state, cfg, loader, val, log, run, runner, progress) -> None:
    device = state.model.out.weight.device
    limit = cfg.time_limit_min * 60 if cfg.time_limit_min > 0 else float("inf")
    bar = tqdm(total=cfg.steps, initial=state.step, desc="meta-train", disable=None if progress else True)
    window: list[torch.Tensor] = []
    batches, guard = _batches(loader, state.step), CollapseGuard(cfg)
    while state.step < cfg.steps and state.elapsed < limit:
        t0 = time.perf_counter()
        state.model.train()
        _set_lr(state, cfg)
        res = meta_step(state, next(batches).to(device), cfg, runner)
        # under torchrun every rank takes the slowest rank's clock: the same lr and the same last step
        state.elapsed = dist.agree_max(state.elapsed + time.perf_counter() - t0)
        window.append(res.psnr)
        bar.update(1)
        if state.step % cfg.log_every == 0 and log is not None:
            psnr = torch.cat(window).mean().item()
            window.clear()
            bar.set_postfix(psnr=f"{psnr:.2f}")
            log.log({"step": state.step, "minutes": state.elapsed / 60, "train_psnr": psnr,
                     "inner_mse": res.inner_mse.mean(0).tolist()})
        if state.step % cfg.val_every == 0 and _validate(state, cfg, val, log, run, guard, runner):
            batches, bar.n = _batches(loader, state.step), state.step
            window.clear()
            continue
        if state.step % cfg.ckpt_every == 0:
            save_state(state, run)
    bar.close()
    save_state(state, run)
