"""Functa meta-step against its real peer: a batched plain-autograd step (COIN++ style), measured fairly.

    python benchmarks/bench_functa_peers.py [--rounds 2] [--repeat 5] [--policy default|passive|both]

Each measurement runs in its own fresh Python process (so that no thread pool, allocator or
OpenMP setting of one implementation leaks into the other), in interleaved rounds
(peer, nnlab, peer, nnlab, ...), for two configurations:

- ``coinpp-mnist``: COIN++'s MNIST setting: 5 layers of width 64, latent 64, linear latent map,
  plain SGD inner loop at lr 1e-2 (no Meta-SGD), 3 inner steps, second order, batch 16;
- ``mnist-cpu``: nnlab's preset (width 64, 3 sine layers, latent 256, Meta-SGD), batch 32.

Implementations (both include the Adam step on the shared weights):

- ``peer``: :func:`nnlab.functa.reference.meta_loss_batched_autograd` (whole batch,
  ``torch.autograd.grad(create_graph=True)``, no per-image loop), then ``.backward()``;
- ``nnlab``: the trainer's step (:func:`nnlab.functa.trainer.meta_step`: the hand-derived inner
  gradient, chunks on worker threads);
- ``nnlab-compiled``: the same step with ``compile=True`` (each chunk's meta-loss through
  torch.compile, :class:`nnlab.functa.meta.CompiledMetaLoss`); its compile time is printed apart
  and not counted in the step time.

An nnlab implementation name may end in ``@N`` to run chunks of at most N images instead of the
trainer's default (``--impls peer,nnlab,nnlab@4,nnlab@2``).

With ``--fit`` it also times fitting (functaset writing: 3 inner steps, no meta-gradient) on a
batch of ``--fit-batch`` images: the peer's batched autograd
(:func:`nnlab.functa.reference.fit_latents_batched_autograd`) against nnlab's
:func:`nnlab.functa.functaset.fit_batch`, in images/s (issue-17 target: nnlab >= 1,500 images/s
on mnist-cpu).

It prints ms per step for each, the ratio (the issue-17 target is >= 3x), the FLOPs of one step
(counted on the peer with ``torch.utils.flop_counter``: matmuls and their backward) and the
fraction of the fp32 matmul peak each reaches (peak measured in the same run). ``--policy``
runs the children with ``OMP_WAIT_POLICY`` unset (``default``), ``PASSIVE``, or both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "coinpp-mnist": dict(model=dict(width=64, depth=5, latent_dim=64, w0=30.0, meta_sgd=False, inner_lr=1e-2),
                         batch=16),
    "mnist-cpu": dict(preset="mnist-cpu", batch=32),
}


def _model_and_batch(name: str):
    import torch

    from nnlab.functa.model import FunctaConfig, LatentModulatedSiren
    from nnlab.functa.presets import get_preset

    spec = CONFIGS[name]
    cfg = get_preset(spec["preset"]).model if "preset" in spec else FunctaConfig(**spec["model"])
    torch.manual_seed(0)
    model = LatentModulatedSiren(cfg)
    x = torch.rand(spec["batch"], cfg.out_channels, 28, 28)
    return model, x


IMPLS = ("peer", "nnlab", "nnlab-compiled")


def fit_child(name: str, impl: str, repeat: int, batch: int) -> dict:
    """Run in a fresh process: images/s of fitting ``batch`` images with ``impl`` on config ``name``."""
    import torch

    from nnlab.functa import reference
    from nnlab.functa.functaset import fit_batch
    from nnlab.functa.parallel import chunk_runner

    model, _ = _model_and_batch(name)
    x = torch.rand(batch, model.config.out_channels, 28, 28)
    with chunk_runner(0) as runner:
        def fit():
            if impl == "peer":
                reference.fit_latents_batched_autograd(model, x, 3)
            else:
                with torch.no_grad():
                    fit_batch(model, x, 3, runner=runner, compile=impl == "nnlab-compiled")
        t = time.perf_counter()
        fit()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(repeat):
            fit()
        seconds = (time.perf_counter() - t) / repeat
    return {"images_per_s": batch / seconds, "threads": torch.get_num_threads(), "first_s": compile_s}


def child(name: str, impl: str, repeat: int) -> dict:
    """Run in a fresh process: ms per step of ``impl`` on config ``name``."""
    import torch

    from nnlab.functa import reference

    model, x = _model_and_batch(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    impl, _, chunk = impl.partition("@")  # "nnlab@4": chunks of at most 4 images
    if impl == "peer":
        def step():
            opt.zero_grad()
            reference.meta_loss_batched_autograd(model, x, 3).backward()
            opt.step()
    else:
        from nnlab.functa.parallel import chunk_runner
        from nnlab.functa.presets import MetaTrainConfig
        from nnlab.functa.trainer import TrainState, meta_step

        state = TrainState(model, opt)
        cfg = MetaTrainConfig(batch_size=len(x), inner_steps=3, compile=impl == "nnlab-compiled")
        cfg.chunk = int(chunk) if chunk else cfg.chunk
        runner_cm = chunk_runner(0)
        runner = runner_cm.__enter__()

        def step():
            meta_step(state, x, cfg, runner)
    t = time.perf_counter()
    step()  # compiles (nnlab-compiled)
    first_s = time.perf_counter() - t
    step()
    t = time.perf_counter()
    for _ in range(repeat):
        step()
    return {"ms": 1000 * (time.perf_counter() - t) / repeat, "threads": torch.get_num_threads(), "first_s": first_s}


def _matmul_counter():
    """A dispatch mode summing 2*m*n*k over every matrix product (torch's FlopCounterMode cannot
    follow autograd.grad inside a backward, which the second-order step needs)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    two_args = (aten.mm.default, aten.bmm.default)
    three_args = (aten.addmm.default, aten.baddbmm.default)

    class Count(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in two_args or func in three_args:
                a, b = args[:2] if func in two_args else args[1:3]
                batch = a.shape[0] if a.dim() == 3 else 1
                Count.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            return out

    return Count


def flops_and_peak(name: str) -> dict:
    """FLOPs of one peer step (forward + backward, matmuls) and the fp32 matmul peak, in GFLOP/s."""
    import torch

    from nnlab.functa import reference

    model, x = _model_and_batch(name)
    counter = _matmul_counter()
    with counter():
        reference.meta_loss_batched_autograd(model, x, 3).backward()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    peak = 20 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9
    return {"gflop": counter.flops / 1e9, "peak_gflops": peak}


def _spawn(args: list[str], policy: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--policy", choices=["default", "passive", "both"], default="default")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help=f"which of {', '.join(IMPLS)} to time (an nnlab one may end in @N: chunks of N images)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--_child", nargs=3, metavar=("CONFIG", "IMPL", "REPEAT"), help=argparse.SUPPRESS)
    ap.add_argument("--_flops", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--fit", action="store_true", help="also time fitting (functaset writing)")
    ap.add_argument("--fit-batch", type=int, default=256, help="images per timed fit")
    ap.add_argument("--_fit_child", nargs=4, metavar=("CONFIG", "IMPL", "REPEAT", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child[0], args._child[1], int(args._child[2]))))
        return
    if args._fit_child:
        c, impl, repeat, batch = args._fit_child
        print(json.dumps(fit_child(c, impl, int(repeat), int(batch))))
        return
    if args._flops:
        print(json.dumps(flops_and_peak(args._flops)))
        return
    policies = {"default": [None], "passive": ["PASSIVE"], "both": [None, "PASSIVE"]}[args.policy]
    report = {}
    for name in args.configs.split(","):
        fp = _spawn(["--_flops", name], None)
        for policy in policies:
            report[f"{name}/{policy or 'unset'}"] = _step_rounds(name, policy, fp, args)
        if args.fit:
            report[f"{name}/fit"] = _fit_rounds(name, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _step_rounds(name: str, policy: str | None, fp: dict, args) -> dict:
    """Interleaved meta-step rounds (peer, nnlab, nnlab-compiled, ...), each in a fresh process."""
    impls = args.impls.split(",")
    ms, first = {k: [] for k in impls}, {k: [] for k in impls}
    for _ in range(args.rounds):
        for impl in impls:
            r = _spawn(["--_child", name, impl, str(args.repeat)], policy)
            ms[impl].append(r["ms"])
            first[impl].append(r["first_s"])
    med = {k: statistics.median(v) for k, v in ms.items()}
    frac = {k: fp["gflop"] / (v / 1000) / fp["peak_gflops"] for k, v in med.items()}
    ratios = {k: med["peer"] / v for k, v in med.items() if k != "peer" and "peer" in med}
    print(f"{name:13s} OMP_WAIT_POLICY={policy or 'unset':7s} {fp['gflop']:.2f} GFLOP per step, matmul peak "
          f"{fp['peak_gflops']:.0f} GFLOP/s")
    for k in impls:
        extra = f" -> {ratios[k]:.2f}x the peer (target >= 3x)" if k in ratios else ""
        print(f"  {k:15s} {' / '.join(f'{v:.0f}' for v in ms[k])} ms ({100 * frac[k]:.0f}% of peak; first step "
              f"{' / '.join(f'{v:.1f}' for v in first[k])} s){extra}")
    return {"ms": ms, "median_ms": med, "ratio": ratios, **fp, "peak_fraction": frac, "first_step_s": first}


def _fit_rounds(name: str, args) -> dict:
    """Interleaved fitting rounds (peer, nnlab, ...), each in a fresh process, OMP policy unset."""
    ips = {k: [] for k in args.impls.split(",") if "@" not in k}  # fitting has no chunk setting to vary
    for _ in range(args.rounds):
        for impl in ips:
            ips[impl].append(_spawn(["--_fit_child", name, impl, str(args.repeat), str(args.fit_batch)],
                                    None)["images_per_s"])
    med = {k: statistics.median(v) for k, v in ips.items()}
    ratios = {k: v / med["peer"] for k, v in med.items() if k != "peer" and "peer" in med}
    print(f"{name:13s} fitting, {args.fit_batch} images, 3 steps (target: nnlab >= 1500 images/s on mnist-cpu):")
    for k, v in ips.items():
        extra = f" -> {ratios[k]:.2f}x the peer" if k in ratios else ""
        print(f"  {k:15s} {' / '.join(f'{x:.0f}' for x in v)} images/s{extra}")
    return {"images_per_s": ips, "median": med, "ratio": ratios}


if __name__ == "__main__":
    main()
