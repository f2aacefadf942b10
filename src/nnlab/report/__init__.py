"""Reports built from experiment files: markdown and self-contained HTML, tables from CSV.

:func:`build_report` gathers each study's stage outcomes (metrics, CSV tables, PNG figures) into
``OUT/report.md``, ``OUT/report.html`` (images by relative path, readable offline),
``OUT/figures/``, ``OUT/tables/`` and ``OUT/summary.json``.
"""
from __future__ import annotations

import csv
import html
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from nnlab.engine.io import atomic_write, atomic_write_text, write_json


@dataclass
class Section:
    """One study's part of the report."""

    study: str
    title: str
    intro: str
    # (metric key in stage metrics, label, key in the seed numbers or None, scale to the seed's unit)
    headline: Sequence[tuple[str, str, str | None, float]]


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    summary: Path


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write ``rows`` under ``header`` to ``path`` atomically (the one CSV writer of nnlab: a killed
    process leaves the old file or the new one, never half of it); returns the path."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(Path(path), write)


def write_records_csv(path: str | Path, records: Sequence[dict[str, Any]], columns: Sequence[str] = (),
                      ) -> Path:
    """Dict ``records`` as CSV through :func:`write_csv`: ``columns`` first, in that order, then every
    other key of any record, sorted; a record lacking a key leaves its cell empty."""
    rest = sorted({k for r in records for k in r} - set(columns))
    header = [*columns, *rest]
    return write_csv(path, header, ([r.get(k, "") for k in header] for r in records))


def read_csv(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    try:
        return _fmt(float(value)) if "." in str(value) else str(value)
    except ValueError:
        return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _collect_files(outcomes, out: Path) -> dict[str, dict[str, list[str]]]:
    """Copy each stage's figures and tables into OUT/figures and OUT/tables; paths per stage."""
    files: dict[str, dict[str, list[str]]] = {}
    for o in outcomes:
        entry = {"figures": [], "tables": []}
        for kind in ("figures", "tables"):
            for rel in getattr(o.result, kind):
                src = o.dir / rel
                if not src.is_file():
                    continue
                dst = out / kind / f"{o.name}-{Path(rel).name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.resolve() != dst.resolve():
                    shutil.copyfile(src, dst)
                entry[kind].append(dst.relative_to(out).as_posix())
        files[o.name] = entry
    return files


# A report is a list of blocks, rendered to both markdown and HTML:
# ("h1"|"h2"|"h3", text), ("p", text), ("ul", [items]), ("table", (header, rows)), ("img", (path, caption))
Block = tuple[str, Any]

_CSS = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
        "text-align:right}th{background:#eee}figure{display:inline-block;margin:.5em}"
        "img{max-width:32em;border:1px solid #ddd}.failed{color:#b00}")


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + value)
        elif kind == "p":
            out.append(value)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in value))
        elif kind == "table":
            out.append(markdown_table(*value))
        elif kind == "img":
            out.append(f"![{value[1]}]({value[0]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[Block], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(value)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in value) + "</ul>")
        elif kind == "table":
            out.append(html_table(*value))
        elif kind == "img":
            src, cap = (html.escape(v, quote=True) for v in value)
            out.append(f"<figure><img src='{src}' alt='{cap}'><figcaption>{cap}</figcaption></figure>")
    return "\n".join(out) + "\n</body></html>\n"


def headline_rows(section: Section, metrics: dict[str, Any], seed: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[label, measured, seed, seed source]`` of a section's headline comparison."""
    rows = []
    for key, label, seed_key, scale in section.headline:
        value = metrics.get(key)
        ref = seed.get(section.study, {}).get(seed_key, {}) if seed_key else {}
        if value is None and ref.get("value") is None:
            continue  # not measured by this preset, and nothing to compare with
        rows.append([label, value * scale if isinstance(value, (int, float)) else value,
                     ref.get("value"), ref.get("source", "")])
    return rows


def section_blocks(section: Section, outcomes, files, seed: dict[str, Any]) -> tuple[list[Block], dict]:
    """The blocks of one study's section and its headline figures for summary.json."""
    mine = [o for o in outcomes if o.study == section.study]
    metrics = {k: v for o in mine for k, v in o.result.metrics.items()}
    rows = headline_rows(section, metrics, seed)
    blocks: list[Block] = [("h2", section.title), ("p", section.intro)]
    notes = [n for o in mine for n in o.result.notes]
    notes += [f"Stage {o.name} {o.status}: {o.error}" for o in mine if o.status in ("failed", "skipped")]
    if notes:
        blocks.append(("ul", notes))
    blocks.append(("table", (["figure", "measured", "seed report", "seed source"], rows)))
    for o in mine:
        for rel in files.get(o.name, {}).get("tables", []):
            header, body = read_csv(_root(o) / rel)
            blocks += [("h3", f"{o.title}: {Path(rel).stem}"), ("table", (header, body[:40]))]
        for rel in files.get(o.name, {}).get("figures", []):
            blocks.append(("img", (rel, f"{o.title}: {Path(rel).stem}")))
    summary = {r[0]: {"measured": r[1], "seed": r[2], "source": r[3]} for r in rows}
    return blocks, summary


def _root(outcome) -> Path:
    """The reproduce output folder of a stage outcome (stage dirs are OUT/stages/<name>)."""
    return Path(outcome.dir).parent.parent


def build_report(outcomes, out: str | Path, sections: Sequence[Section], seed: dict[str, Any], *,
                 title: str, preamble: Sequence[str] = ()) -> ReportFiles:
    """Write report.md, report.html, figures/, tables/ and summary.json into ``out``."""
    out = Path(out)
    files = _collect_files(outcomes, out)
    stage_rows = [[o.name, o.status, round(o.seconds, 1), o.error] for o in outcomes]
    blocks: list[Block] = [("h1", title), *[("p", p) for p in preamble],
                           ("table", (["stage", "status", "seconds (last attempt)", "error"], stage_rows))]
    headline = {}
    for section in sections:
        if any(o.study == section.study for o in outcomes):
            sec_blocks, headline[section.study] = section_blocks(section, outcomes, files, seed)
            blocks += sec_blocks
    md = atomic_write_text(out / "report.md", render_markdown(blocks))
    page = atomic_write_text(out / "report.html", render_html(blocks, title))
    summary = write_json(out / "summary.json", {
        "title": title, "headline": headline,
        "stages": [{"name": o.name, "study": o.study, "status": o.status, "seconds": o.seconds,
                    "error": o.error, "metrics": o.result.metrics} for o in outcomes]})
    return ReportFiles(md, page, summary)
