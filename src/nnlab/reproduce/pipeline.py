"""``reproduce()``: build a preset's stages, run them, and write the report."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import yaml

from nnlab.errors import ConfigError
from nnlab.registry import Registry
from nnlab.report import ReportFiles, Section, build_report
from nnlab.reproduce.common import check_data_dir
from nnlab.reproduce.stages import Stage, StageOutcome, run_stages, seed_stages

# preset name -> builder() -> list of stages, in run order
PRESETS: Registry = Registry("reproduce preset")
# study name -> its report section
SECTIONS: dict[str, Section] = {}
STUDIES = ("functa", "prune", "landscape", "lbi")  # the subpackages' names
STUDY_ALIASES = {"vit": "prune", "bn": "landscape"}  # the names --only took before (still accepted)


@dataclass
class ReproduceResult:
    outcomes: list[StageOutcome]
    report: ReportFiles

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "skipped")]


def seed_numbers() -> dict:
    """The seed report's numbers (``seed_numbers.yaml``), with their sources."""
    text = resources.files("nnlab.reproduce").joinpath("seed_numbers.yaml").read_text()
    return yaml.safe_load(text)


def _announce(stages: Sequence[Stage]) -> Callable[[int, Stage], None]:
    print("nnlab reproduce: stages", file=sys.stderr)
    for i, s in enumerate(stages, 1):
        print(f"  {i}. [{s.study}] {s.title}", file=sys.stderr)

    def on_stage(i: int, stage: Stage) -> None:
        print(f"\n==> [{i + 1}/{len(stages)}] {stage.study}: {stage.title}", file=sys.stderr, flush=True)

    return on_stage


def reproduce(preset: str, out: str | Path, *, data_dir: str | Path | None = None,
              only: Sequence[str] | None = None, reuse: str | Path | None = None) -> ReproduceResult:
    """Run preset ``preset`` (``quick``, ``cpu``, ``paper``, ``cpu-full``) into ``out``; studies in ``only``
    or stages named in ``only`` if given (:func:`select_stages`). ``reuse``: a
    published run of the same preset (e.g. ``docs/results/cpu``) whose finished stages, where their config
    is unchanged, are copied in first and reused (:func:`~nnlab.reproduce.stages.seed_stages`)."""
    stages = PRESETS.get(preset)()
    out = Path(out)
    selected = select_stages(stages, only) if only else stages
    check_data_dir(selected, data_dir)
    if reuse is not None:
        seeded = seed_stages(selected, out, Path(reuse))
        print(f"nnlab reproduce: {len(seeded)} finished stage(s) copied from {reuse}"
              + (f": {', '.join(seeded)}" if seeded else ""), file=sys.stderr)
    outcomes = run_stages(selected, out, data_dir=Path(data_dir) if data_dir else None,
                          on_stage=_announce(selected))
    sections = [SECTIONS[s] for s in STUDIES if s in SECTIONS]
    report = build_report(outcomes, out, sections, seed_numbers(),
                          title=f"nnlab reproduce: preset {preset}", preamble=_preamble(preset, data_dir, outcomes))
    return ReproduceResult(outcomes, report)


def plan(preset: str, out: str | Path, only: Sequence[str] | None = None) -> list[str]:
    """One line per stage of ``preset`` (those of ``only``, as :func:`reproduce` selects them): its number, name,
    what ``out`` holds for it (:func:`~nnlab.reproduce.stages.stage_state`), its time-limited minutes if any
    ("published" for a stage that shows a published run instead of training), and its title; then a total. Runs
    nothing."""
    from nnlab.reproduce.stages import stage_state, time_limit_min

    stages = PRESETS.get(preset)()
    selected = select_stages(stages, only) if only else stages
    width, left, todo, lines = max(len(s.name) for s in selected), 0.0, 0, []
    for i, s in enumerate(selected, 1):
        state, published = stage_state(s, Path(out)), bool(s.config.get("published"))
        minutes = 0.0 if published else time_limit_min(s.config)  # a published run: trains nothing
        if state != "finished":
            left, todo = left + minutes, todo + 1
        limit = "published" if published else f"{minutes:g} min" if minutes else ""
        lines.append(f"{i:>3}. {s.name:<{width}}  {state:<11}  {limit:>8}  {s.title}")
    lines.append(f"{todo} of {len(selected)} stage(s) to run; at most {left:g} min of time-limited work among them "
                 "(an interrupted stage resumes with what is left of its budget), plus the epoch-limited stages")
    return lines


def select_stages(stages: Sequence[Stage], only: Sequence[str]) -> list[Stage]:
    """The stages of the studies or stage names in ``only``, with the stages they need (transitively), in
    run order; the old study names ``vit`` and ``bn`` are accepted."""
    only = {STUDY_ALIASES.get(name, name) for name in only}
    by_name = {s.name: s for s in stages}
    unknown = sorted(only - set(STUDIES) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown stud{'y' if len(unknown) == 1 else 'ies'} or stage(s) {', '.join(unknown)} for "
                          f"--only; choose studies from {', '.join(STUDIES)} or stages from {', '.join(by_name)}")
    chosen = {s.name for s in stages if s.study in only or s.name in only}
    todo = list(chosen)
    while todo:
        for name in by_name[todo.pop()].needs:
            if name in by_name and name not in chosen:
                chosen.add(name)
                todo.append(name)
    return [s for s in stages if s.name in chosen]


def _preamble(preset: str, data_dir, outcomes: Sequence[StageOutcome]) -> list[str]:
    import os
    import platform

    import torch

    ran = sum(o.seconds for o in outcomes if o.status == "done")
    total = sum(o.seconds for o in outcomes)
    sources = sorted({o.seeded_from for o in outcomes if o.seeded_from})
    copied = [f"{sum(o.seeded_from == src for o in outcomes)} stage(s) were run earlier and published in {src}, "
              "then reused here (`--reuse`); their seconds are those of that run." for src in sources]
    return [f"Preset {preset!r}; data: {data_dir or 'embedded mnist-5k only'}.",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}"
            f"{', CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ', no GPU'}. "
            f"Stage time: {total / 60:.1f} min in all, counting each stage's last attempt only "
            f"({ran / 60:.1f} min run now, the rest reused).",
            "Numbers in the 'seed report' columns come from nnlab/reproduce/seed_numbers.yaml, with their "
            "sources; every difference from the seed's set-up is listed at the top of each section.", *copied]
