"""``nnlab recheck RUN --out DIR``: rerun a published run's first steps and compare its logged losses."""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recheck", help="rerun a published run's first N steps; compare the logged losses",
        description="Retrain the first --max-steps steps of RUN from its config.yaml (same seed, same "
                    "thread count, schedule unchanged) into --out, and compare the training losses RUN "
                    "logged for those steps. Exit status 0 when all agree to --rtol, 1 otherwise.")
    p.add_argument("run", metavar="RUN", help="a run folder with config.yaml and metrics.jsonl "
                   "(e.g. docs/results/cifar-seed-scale/bn-lr0.1/bn-on/lr-0.1)")
    p.add_argument("--out", required=True, help="new folder for the rerun")
    p.add_argument("--max-steps", type=_positive_int, default=60, help="steps to rerun")
    p.add_argument("--data-dir", help="data folder, if not where the run found it")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance on each logged loss")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from nnlab.engine.recheck import recheck

    r = recheck(args.run, args.out, max_steps=args.max_steps, data_dir=args.data_dir, rtol=args.rtol,
                progress=args.progress)
    print(f"{'step':>6}  {'published':>12}  {'rerun':>12}  rel. diff")
    for step, a, b in zip(r.steps, r.published, r.rerun):
        print(f"{step:>6}  {a:>12.6f}  {b:>12.6f}  {abs(b - a) / max(abs(a), 1e-12):.1e}")
    verdict = "agree" if r.ok else "DIFFER"
    print(f"{verdict}: largest relative difference {r.max_rel_diff:.1e} (tolerance {r.rtol:g}) over "
          f"{len(r.steps)} logged steps")
    return 0 if r.ok else 1
