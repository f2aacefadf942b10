"""The ratio sweep: every method at every ratio on one base ViT; CSV, Markdown table, plots, models.

``DIR/results.csv``: ``method,ratio,top1,top5,gflops,images_per_s,achieved_ratio`` (one row per
method and ratio, plus ``base`` at ratio 0, and ``p-vit`` at ratio 0: the gated model before any
dimension is removed, so that the effect of gate training is not read as one of pruning). Rows are
appended as they finish and skipped when the sweep is run again (resumable). ``DIR/sweep.json``: the SHA-256 of the base model's weights
and the settings that change the measured numbers; a rerun into ``DIR`` with another base model
or other settings is refused, so rows of two models never mix. ``DIR/apvit_thresholds.csv``:
AP-ViT threshold -> ratio.
``DIR/models/METHOD-RATIO/``: each pruned model (:func:`nnlab.prune.io.save_pruned`).
``DIR/prepared/NAME.safetensors``: what a method trains once per sweep (P-ViT's gated model, AP-ViT's
agents, APT's jointly trained copy), written atomically as soon as it is trained, so a killed sweep
resumes without training it again (:meth:`_Sweep.prepared`).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nnlab.data import DatasetSplits, load_dataset
from nnlab.engine.checkpoint import tensors_sha256
from nnlab.engine.distributed import resolve_device
from nnlab.engine.io import atomic_write, read_json, to_jsonable, write_json
from nnlab.engine.runs import folder_lock
from nnlab.engine.trained import load_trained_run
from nnlab.errors import CheckpointError, ConfigError, DivergenceError
from nnlab.models.vit import ViT
from nnlab.prune import apvit
from nnlab.prune import methods as M
from nnlab.prune.common import (accuracy, calibration_batch, ensure_dir, eval_transform, model_device, throughput,
                                train_loader)
from nnlab.prune.io import save_pruned
from nnlab.prune.plots import write_plots, write_table
from nnlab.prune.runners import TokenRunner
from nnlab.prune.slim import attach_gates
from nnlab.report import write_csv, write_records_csv

METHODS = ("p-vit", "ap-vit", "cp-vit", "tome", "ap-vit-joint")
DEFAULT_METHODS = METHODS[:4]  # ap-vit-joint trains a backbone copy (APT's three streams): asked for by name
COLUMNS = ["method", "ratio", "top1", "top5", "gflops", "images_per_s", "achieved_ratio", "heads_kept"]


# what to change when a method's model gives NaN logits (its training diverged)
DIVERGED_FIX = {"base": "the base model itself is broken: check --checkpoint",
                "p-vit": "its gate training or fine-tuning diverged: lower --pvit-gate-lr / --pvit-gate-gate-lr / "
                         "--pvit-finetune-lr",
                "ap-vit": "its agents' training diverged: lower --apvit-lr",
                "ap-vit-joint": "its joint training diverged: lower --apvit-joint-lr / --apvit-lr"}


@dataclass
class PruneSweepConfig:
    checkpoint: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # p-vit, ap-vit, cp-vit, tome; also ap-vit-joint
    ratios: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])  # pruning ratios in [0, 1)
    data: str | None = None          # data set (default: the run's; required for a weights file)
    arch: str | None = None          # architecture of a weights file: deit-tiny/small/base, vit-tiny16/s16/b16/l16
    data_dir: str | None = None      # data folder or .tar.gz
    batch_size: int = 64             # batch size of the throughput timing
    eval_batch_size: int = 256       # batch size of the accuracy evaluation
    calib_size: int = 512            # train images for CP-ViT ranges, AP-ViT agents and thresholds
    test_limit: int | None = None    # evaluate on N random test images (seeded)
    timing_repeats: int = 5          # timed passes per row (the fastest is kept)
    save_models: bool = True         # save each pruned model under OUT/models/METHOD-RATIO
    device: str = "auto"             # auto (a GPU if any), cpu or cuda: where pruning, evaluation and timing run
    pvit: M.PViTOptions = field(default_factory=M.PViTOptions)
    apvit: M.APViTOptions = field(default_factory=M.APViTOptions)
    cpvit: M.CPViTOptions = field(default_factory=M.CPViTOptions)
    seed: int = 0                    # calibration subsets, test subset, P-ViT and agent training

    def validate(self) -> "PruneSweepConfig":
        """Raise a ConfigError naming the first bad setting (the flag's spelling) and its range."""
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ConfigError(f"unknown pruning method(s) {bad}; choose from {', '.join(METHODS)}")
        if not self.ratios or any(not 0 <= r < 1 for r in self.ratios):
            raise ConfigError(f"ratios must be in [0, 1), got {self.ratios}")
        p, a = self.pvit, self.apvit
        checks = [("batch-size", self.batch_size, 1), ("eval-batch-size", self.eval_batch_size, 1),
                  ("calib-size", self.calib_size, 1), ("timing-repeats", self.timing_repeats, 1),
                  ("test-limit", self.test_limit or 1, 1), ("pvit-gate-epochs", p.gate_epochs, 0),
                  ("pvit-finetune-epochs", p.finetune_epochs, 0), ("pvit-train-limit", p.train_limit or 1, 1),
                  ("apvit-agents", a.agents, 1), ("apvit-hidden", a.hidden, 1),
                  ("apvit-candidates", a.candidates, 1), ("apvit-epochs", a.epochs, 0),
                  ("apvit-joint-epochs", a.joint_epochs, 1), ("apvit-joint-train-limit", a.joint_train_limit or 1, 1)]
        for flag, value, low in checks:
            if value < low:
                raise ConfigError(f"--{flag} must be >= {low}, got {value}")
        if not 0 <= self.cpvit.head_share <= 1:
            raise ConfigError(f"--cpvit-head-share must be in [0, 1], got {self.cpvit.head_share}")
        if not a.thresholds or any(not 0 <= t <= 1 for t in a.thresholds):  # drop probabilities of the agents
            raise ConfigError(f"--apvit-thresholds must be probabilities in [0, 1], got {a.thresholds}")
        for flag, value in (("pvit-gate-lr", p.gate_lr), ("pvit-gate-gate-lr", p.gate_gate_lr),
                            ("pvit-finetune-lr", p.finetune_lr), ("apvit-lr", a.lr), ("pvit-l1-weight", p.l1_weight),
                            ("apvit-joint-lr", a.joint_lr)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{flag} must be a finite number >= 0, got {value}")
        return self


@dataclass
class PruneSweepResult:
    rows: list[dict]
    out: Path


def load_base(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
              arch: str | None = None) -> tuple[ViT, DatasetSplits]:
    """The trained ViT of run folder ``checkpoint`` (from ``nnlab train``, or a published copy with
    ``model.safetensors``; :func:`nnlab.engine.trained.load_trained_run`) and its whole data set; or
    of a timm / DeiT / Hugging Face weights file (``arch`` gives its head count, ``data`` is required).
    The model comes back with ``patch_dropout`` 0 (see :class:`nnlab.models.vit.ViTConfig`)."""
    if Path(checkpoint).is_file():
        return _load_weights_file(Path(checkpoint), data, data_dir, arch)
    if not Path(checkpoint).is_dir():
        raise CheckpointError(f"run folder {checkpoint} does not exist; train one with "
                              "'nnlab train --config configs/vit-mnist.yaml --out RUN'")
    run = load_trained_run(checkpoint, data=data, data_dir=data_dir, subsets=False)  # pruning sees all images
    if not isinstance(run.model, ViT):
        raise ConfigError(f"run {checkpoint} trained {run.config.model!r}, not a ViT; prune a vit-* model")
    # Patch dropout is a training-time regulariser of the base model. The methods choose the tokens
    # themselves, and P-ViT's fine-tuning and APT's joint training run the model in training mode,
    # where a random drop would change the token count under the agents' masks: off from here on.
    run.model.config = dataclasses.replace(run.model.config, patch_dropout=0.0)
    return run.model, run.data


def _load_weights_file(path: Path, data: str | None, data_dir: str | None, arch: str | None
                       ) -> tuple[ViT, DatasetSplits]:
    from nnlab.models.vit_import import load_foreign_vit

    if data is None:
        raise ConfigError(f"{path} is a weights file without a data set; pass --data (and --data-dir)")
    model = load_foreign_vit(path, arch=arch)
    splits = load_dataset(data, data_dir)
    c = model.config
    ch, h, _ = splits.shape
    if ch != c.in_chans or c.num_classes != splits.num_classes:
        raise ConfigError(f"{path} is a ViT for {c.in_chans}-channel images and {c.num_classes} classes; {data} has "
                          f"{ch} channel(s) and {splits.num_classes} classes: fine-tune it on {data} first")
    if h != c.image_size:  # e.g. CIFAR-10 at 32 px into a 224 px model: resized inside ViT.embed
        model.config = dataclasses.replace(c, input_size=h)
    return model, splits


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (v if k == "method" or v == "" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _append(path: Path, row: dict) -> None:
    """Rewrite ``results.csv`` atomically with ``row`` added (a kill never leaves half a row)."""
    rows = read_rows(path) + [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}]
    write_records_csv(path, rows, COLUMNS)


class _Sweep:
    """State shared by the methods of one sweep (data, timing batch, prepared gates/agents)."""

    def __init__(self, config: PruneSweepConfig):
        from nnlab.engine.runs import check_out

        self.c = config.validate()
        check_out(config.out)
        self.device = resolve_device(config.device)
        self.vit, self.data = load_base(config.checkpoint, config.data, config.data_dir, config.arch)
        self.vit = self.vit.to(self.device)
        size = self.vit.config.image_size
        self.transform = eval_transform(self.data, size)
        self.test = self.data.test.random_subset(config.test_limit, config.seed)
        self.timing_x, _ = calibration_batch(self.data, size, config.batch_size, seed=config.seed + 1)
        self.calib_x, self.calib_y = calibration_batch(self.data, size, config.calib_size, seed=config.seed)
        self.timing_x, self.calib_x, self.calib_y = (t.to(self.device) for t in (self.timing_x, self.calib_x,
                                                                                 self.calib_y))
        self.out = ensure_dir(config.out)
        self.csv = self.out / "results.csv"
        self._prepared: dict = {}

    def measure(self, runner: TokenRunner, method: str, ratio: float) -> dict:
        runner.to(self.device).reset_stats()  # a slimmed P-ViT is built anew: bring it to the device
        acc = accuracy(runner, self.test, self.transform, self.c.eval_batch_size, desc=f"{method} {ratio}")
        if acc.nonfinite:
            raise DivergenceError(f"{method} at ratio {ratio:g} gives NaN or infinite logits on {acc.nonfinite} of "
                                  f"{acc.n} test images; {DIVERGED_FIX.get(method, DIVERGED_FIX['base'])}")
        achieved = M.pvit_ratio_of(runner, self.vit) if method == "p-vit" else runner.achieved_ratio()
        macs = runner.macs()
        ips = throughput(runner, self.timing_x, repeats=self.c.timing_repeats)
        return {"method": method, "ratio": ratio, "top1": acc.top1, "top5": acc.top5, "gflops": macs / 1e9,
                "images_per_s": ips, "achieved_ratio": achieved, "heads_kept": runner.heads_kept()}

    def prepared(self, name: str, train, blank) -> nn.Module:
        """The module ``train()`` returns, trained once per sweep folder: its tensors go to
        ``OUT/prepared/NAME.safetensors`` (atomically), and a resumed sweep loads them into ``blank()``
        (the same structure, untrained) instead of training again. The folder's sweep.json already
        ties them to this base model and these settings."""
        if name in self._prepared:
            return self._prepared[name]
        path = self.out / "prepared" / f"{name}.safetensors"
        if path.is_file():
            module = blank()
            try:
                module.load_state_dict(load_file(path, device=str(self.device)))
            except (SafetensorError, RuntimeError, OSError) as e:
                raise CheckpointError(f"{path} is unreadable or does not fit ({str(e).splitlines()[0]}); delete "
                                      "it and rerun the sweep to train it again") from None
        else:
            module = train()
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            atomic_write(path, lambda tmp: save_file(state, tmp))
        self._prepared[name] = module.eval()
        return module

    def build(self, method: str, ratio: float) -> TokenRunner:
        if method == "cp-vit":
            if "ranges" not in self._prepared:
                self._prepared["ranges"] = M.attention_ranges(self.vit, self.calib_x)
            return M.build_cpvit(self.vit, ratio, self._prepared["ranges"], self.calib_x[:256], self.c.cpvit)
        if method == "tome":
            return M.build_tome(self.vit, ratio)
        if method == "p-vit":
            return self._build_pvit(ratio)
        if method == "ap-vit-joint":
            return self._build_joint(ratio)
        a = self.c.apvit
        positions = apvit.agent_positions(self.vit.config.depth, a.agents)
        agents = self.prepared("apvit-agents", lambda: M.train_agents(self.vit, self.calib_x, self.calib_y, a)[0],
                               lambda: apvit.new_agents(self.vit.config.dim, a.hidden, len(positions),
                                                        model_device(self.vit)))
        if not (self.out / "apvit_thresholds.csv").is_file():
            self._write_threshold_table(agents, positions)
        return M.build_apvit(self.vit, agents, positions, ratio, self.calib_x[:256], a.fixed_count)

    def _build_pvit(self, ratio: float) -> TokenRunner:
        """P-ViT: the gated model (gates trained once, :meth:`prepared`), slimmed at ``ratio``."""
        batches = train_loader(self.data, 64, self.vit.config.image_size, seed=self.c.seed,
                               limit=self.c.pvit.train_limit)

        def blank() -> nn.ModuleDict:
            model = copy.deepcopy(self.vit)
            return nn.ModuleDict({"model": model, "gates": attach_gates(model)})

        def train() -> nn.ModuleDict:
            model, gates = M.train_gates(self.vit, batches, self.c.pvit)
            return nn.ModuleDict({"model": model, "gates": gates})
        gated = self.prepared("pvit-gates", train, blank)
        return M.build_pvit(gated["model"], gated["gates"], ratio, batches, self.c.pvit)

    def _build_joint(self, ratio: float) -> TokenRunner:
        """AP-ViT with agents trained jointly with a backbone copy (:mod:`nnlab.prune.apt`), once."""
        from nnlab.prune.apt import train_jointly

        a = self.c.apvit
        positions = apvit.agent_positions(self.vit.config.depth, a.agents)

        def train() -> nn.ModuleDict:
            batches = train_loader(self.data, 64, self.vit.config.image_size, seed=self.c.seed,
                                   limit=a.joint_train_limit)
            model, agents, _ = train_jointly(self.vit, batches, a, a.joint_epochs, seed=self.c.seed)
            return nn.ModuleDict({"model": model, "agents": agents})

        def blank() -> nn.ModuleDict:
            agents = apvit.new_agents(self.vit.config.dim, a.hidden, len(positions), model_device(self.vit))
            return nn.ModuleDict({"model": copy.deepcopy(self.vit), "agents": agents})
        joint = self.prepared("apvit-joint", train, blank)
        return M.build_apvit(joint["model"], joint["agents"], positions, ratio, self.calib_x[:256], a.fixed_count)

    def _write_threshold_table(self, agents: nn.ModuleList, positions: list[int]) -> None:
        table = M.threshold_table(self.vit, agents, positions, self.calib_x[:256], self.c.apvit.thresholds)
        write_csv(self.out / "apvit_thresholds.csv", ["threshold", "achieved_ratio"],
                  [(t, round(r, 4)) for t, r in table])


# settings that change the rows already in results.csv (the others: which rows to add, timing)
IDENTITY = ("data", "eval_batch_size", "calib_size", "test_limit", "seed", "pvit", "apvit", "cpvit")


def check_same_base(s: "_Sweep") -> None:
    """Write ``DIR/sweep.json`` (base weights' SHA-256 and the settings of :data:`IDENTITY`), or refuse
    a folder whose rows came from another base model or other settings."""
    settings = {k: v for k, v in dataclasses.asdict(s.c).items() if k in IDENTITY}
    ident = {"base_sha256": tensors_sha256(s.vit.state_dict()), "checkpoint": str(s.c.checkpoint),
             "settings": to_jsonable(settings)}
    path = s.out / "sweep.json"
    if path.is_file():
        old = read_json(path)
        if old.get("base_sha256") != ident["base_sha256"]:
            raise ConfigError(f"{s.out} holds a sweep of another base model ({old.get('checkpoint')}, weights "
                              f"SHA-256 {str(old.get('base_sha256'))[:12]}, not {ident['base_sha256'][:12]}); "
                              "choose a new --out folder so that their rows do not mix")
        diff = sorted(k for k in IDENTITY if old.get("settings", {}).get(k) != ident["settings"].get(k))
        if diff:
            raise ConfigError(f"{s.out} holds a sweep with other settings ({', '.join(diff)}); rerun with the "
                              "original ones to finish it, or choose a new --out folder")
    elif s.csv.is_file():
        raise ConfigError(f"{s.out} has results.csv rows of an unknown base model (no sweep.json); choose a new "
                          "--out folder")
    write_json(path, ident)


def _seed_numbers(data: str) -> dict | None:
    """The seed report's pruning numbers when the sweep's data set is theirs (CIFAR-10), else None."""
    if data != "cifar10":
        return None
    from nnlab.reproduce.pipeline import seed_numbers  # the table's source of truth, with sources
    return seed_numbers()["prune"]


def run_prune_sweep(config: PruneSweepConfig) -> PruneSweepResult:
    """Run (or finish) the sweep described by ``config``; returns all rows of results.csv. The
    output folder is locked while it runs and keyed to the base model (:func:`check_same_base`)."""
    torch.manual_seed(config.seed)  # agent and gate initialisation
    s = _Sweep(config)
    with folder_lock(s.out):
        check_same_base(s)
        return _run_locked(s, config)


def _run_locked(s: "_Sweep", config: PruneSweepConfig) -> PruneSweepResult:
    done = {(r["method"], round(r["ratio"], 4)) for r in read_rows(s.csv)}
    todo = [("base", 0.0)] + [(m, float(r)) for m in config.methods for r in config.ratios]
    for method in ("p-vit", "ap-vit-joint"):  # the gated / jointly fine-tuned model unpruned: training
        if method in config.methods and 0.0 not in config.ratios:  # and pruning are not confounded
            todo.insert(1, (method, 0.0))
    todo = [(m, r) for m, r in todo if (m, round(r, 4)) not in done]
    bar = tqdm(todo, desc="prune sweep", unit="row", disable=None)  # rows land in results.csv as they finish
    for method, ratio in bar:
        bar.set_postfix_str(f"{method} @ {ratio:g}")
        runner = TokenRunner(s.vit) if method == "base" else s.build(method, ratio)
        with torch.no_grad():
            row = s.measure(runner, method, ratio)
        _append(s.csv, row)
        if config.save_models and method != "base":
            save_pruned(runner, s.out / "models" / f"{method}-{ratio:g}", ratio=ratio, top1=row["top1"])
    rows = read_rows(s.csv)
    write_table(rows, s.out / "results.md", seed=_seed_numbers(s.data.name))
    write_plots(rows, s.out)
    return PruneSweepResult(rows=rows, out=s.out)
