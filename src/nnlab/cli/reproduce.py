"""``nnlab reproduce``: run all four studies and write a report beside the seed's numbers."""
from __future__ import annotations

import sys

from nnlab.config import str_list


def register(subparsers) -> None:
    from nnlab.reproduce.pipeline import PRESETS, STUDIES
    import nnlab.reproduce.presets  # noqa: F401  (registers the presets)

    p = subparsers.add_parser("reproduce", help="run all four studies and write a report",
                              description=__doc__)
    p.add_argument("--preset", default="quick", choices=PRESETS.names(),
                   help="quick: embedded digits, <= 15 min on 2 CPU cores (default); "
                        "cpu: real data from --data-dir, hours; paper: the seed's settings, for a GPU")
    p.add_argument("--data-dir", help="folder holding mnist/, cifar10/, celeba/ (as ../shared/data)")
    p.add_argument("--out", default="runs/reproduce", help="report folder (default: runs/reproduce)")
    p.add_argument("--only", type=str_list, help=f"comma-separated studies ({','.join(STUDIES)}; vit and bn: the old "
                   "names of prune and landscape) or stage names (e.g. functa-pixels), with the stages they need")
    p.add_argument("--reuse", metavar="DIR",
                   help="a published run of this preset (e.g. docs/results/cpu, as 'nnlab publish' wrote it): its "
                        "finished stages with an unchanged config are copied into --out and reused, so a long "
                        "preset can be rebuilt over several sittings")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry: a rerun always reuses finished stages and resumes a killed one")
    p.add_argument("--plan", action="store_true",
                   help="list the stages, what --out holds for each (finished, interrupted, outdated, to run) and "
                        "the minutes of the time-limited ones; run nothing")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from nnlab.reproduce.pipeline import plan, reproduce

    if args.plan:
        print("\n".join(plan(args.preset, args.out, only=args.only)))
        return 0
    result = reproduce(args.preset, args.out, data_dir=args.data_dir, only=args.only, reuse=args.reuse)
    print(f"\nreport: {result.report.html}\n        {result.report.markdown}", file=sys.stderr)
    for o in result.failed:
        print(f"stage {o.name} {o.status}: {o.error}", file=sys.stderr)
    return 1 if result.failed else 0
