"""``nnlab publish RUN DEST``: copy a run folder for users to check, minus checkpoints and locks."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("publish", help="copy a run folder minus checkpoints (for docs/results)",
                              description="Copy RUN into DEST as the command wrote it, minus checkpoint/ folders, "
                                          "lock and temporary files and oversized files; DEST/PUBLISHED.json lists "
                                          "every file with its SHA-256.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--max-weights-mb", type=float, default=25.0, help="largest .safetensors file kept")
    p.add_argument("--max-file-mb", type=float, default=20.0, help="largest other file kept")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out paths (relative to RUN) or whole folders matching this glob, e.g. 'models' "
                        "for a pruning sweep's pruned models; repeatable")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from nnlab.report.publish import publish

    result = publish(args.run, args.dest, max_file_mb=args.max_file_mb, max_weights_mb=args.max_weights_mb,
                     exclude=args.exclude)
    print(f"{len(result.copied)} files into {args.dest}; left out: "
          + (", ".join(f"{p} ({why})" for p, why in result.skipped[:6]) or "nothing")
          + (" ..." if len(result.skipped) > 6 else ""))
    return 0
