"""Tables and plots of a sweep, built from the rows of ``results.csv``.

A nominal ratio means different things per method (P-ViT: the fraction of attention and MLP
dimensions its gates remove; the token methods: the fraction of patch tokens removed, averaged
over the blocks), so besides the seed-style table by nominal ratio, results are compared at
*equal compute*: each method's top-1 interpolated at common fractions of the base model's
measured GFLOPs (:func:`at_equal_gflops`), rows keyed by the achieved ratio (a method capped
below a target does not repeat its row), and plots against GFLOPs and against images/s."""
from __future__ import annotations

from pathlib import Path

from nnlab.engine.io import atomic_write_text

ORDER = ["p-vit", "ap-vit", "ap-vit-joint", "cp-vit", "tome"]
NAMES = {"p-vit": "P-ViT", "ap-vit": "AP-ViT", "ap-vit-joint": "AP-ViT (joint, APT)", "cp-vit": "CP-ViT", "tome": "ToMe"}


def _base(rows: list[dict]) -> dict | None:
    """The sweep's row of the unpruned base model, or None."""
    return next((r for r in rows if r["method"] == "base"), None)


def _by_key(rows: list[dict]) -> dict[tuple[str, float], dict]:
    """Rows keyed by (method, ratio rounded to 4 places)."""
    return {(r["method"], round(r["ratio"], 4)): r for r in rows}


def _methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows} - {"base"}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def markdown_table(rows: list[dict]) -> str:
    """Table 1 of the seed: one row per ratio, top-1 / top-5 per method; then cost per method."""
    methods = _methods(rows)
    base = _base(rows)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "base"})
    get = _by_key(rows)
    head = "| ratio | " + " | ".join(f"{NAMES.get(m, m)} top-1 | {NAMES.get(m, m)} top-5" for m in methods) + " |"
    lines = ["## Accuracy (%)", "", head, "|" + " --- |" * (1 + 2 * len(methods))]
    if base:
        lines.append("| 0 (base) | " + " | ".join(f"{100 * base['top1']:.2f} | {100 * base['top5']:.2f}"
                                                   for _ in methods) + " |")
    for ratio in ratios:
        cells = []
        for m in methods:
            r = get.get((m, round(ratio, 4)))
            cells.append(f"{100 * r['top1']:.2f} | {100 * r['top5']:.2f}" if r else "- | -")
        lines.append(f"| {_ratio_label(ratio)} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost: GFLOPs (1e9 MACs) per image / images per s (batch timing) / achieved ratio / heads kept",
              "",
              "| ratio | " + " | ".join(NAMES.get(m, m) for m in methods) + " |", "|" + " --- |" * (1 + len(methods))]
    if base:
        lines.append("| 0 (base) | " + " | ".join(f"{base['gflops']:.4f} / {base['images_per_s']:.0f} / 0 / 1"
                                                   for _ in methods) + " |")
    for ratio in ratios:
        cells = []
        for m in methods:
            r = get.get((m, round(ratio, 4)))
            cells.append(f"{r['gflops']:.4f} / {r['images_per_s']:.0f} / {r['achieved_ratio']:.2f} / "
                         f"{_heads(r)}" if r else "-")
        lines.append(f"| {_ratio_label(ratio)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_label(ratio: float) -> str:
    """Ratio 0 of a method is its own trained, unpruned model (P-ViT's gated model, APT's jointly
    trained copy), not the base model."""
    return "0 (trained, unpruned)" if ratio == 0 else f"{ratio:g}"


def _heads(row: dict) -> str:
    """The row's fraction of head computations done (rows of older sweeps have none)."""
    value = row.get("heads_kept")
    return "n/a" if value is None or value == "" else f"{value:.2f}"


FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def distinct_points(rows: list[dict], method: str) -> list[dict]:
    """A method's rows, one per achieved ratio (rounded to 0.01; the first of equal ones), by GFLOPs."""
    seen, out = set(), []
    for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"]):
        key = round(r["achieved_ratio"], 2)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return sorted(out, key=lambda r: r["gflops"])


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (x, y) points sorted by x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def curve(rows: list[dict], method: str) -> list[dict]:
    """A method's points from unpruned to most pruned (by nominal ratio): its distinct rows, starting
    from its own unpruned row where it has one (P-ViT's gated model, APT's jointly trained copy),
    else from the base model's row."""
    pts = distinct_points(rows, method)
    base = [r for r in rows if r["method"] == "base"]
    own_unpruned = any(r["ratio"] == 0 for r in pts)
    return sorted(pts + ([] if own_unpruned else base), key=lambda r: r["ratio"])


def at_equal_gflops(rows: list[dict], fractions=FRACTIONS) -> dict[str, dict[float, float | None]]:
    """method -> {fraction of the base GFLOPs: top-1 interpolated there} along :func:`curve` (None
    where a method never got that cheap)."""
    base = next(r for r in rows if r["method"] == "base")
    out = {}
    for m in _methods(rows):
        pts = sorted({(r["gflops"], r["top1"]) for r in curve(rows, m)})
        out[m] = {f: interpolate(pts, f * base["gflops"]) for f in fractions}
    return out


def equal_compute_table(rows: list[dict]) -> str:
    """Markdown: top-1 of each method at equal fractions of the base model's GFLOPs."""
    if _base(rows) is None:
        return ""
    table = at_equal_gflops(rows)
    methods = list(table)
    lines = ["## Top-1 (%) at equal compute (fraction of the base model's measured GFLOPs, interpolated)", "",
             "| GFLOPs | " + " | ".join(NAMES.get(m, m) for m in methods) + " | order (best first) |",
             "|" + " --- |" * (2 + len(methods))]
    for f in FRACTIONS:
        cells = ["-" if table[m][f] is None else f"{100 * table[m][f]:.2f}" for m in methods]
        lines.append(f"| {f:g} x base | " + " | ".join(cells) + f" | {ranking({m: table[m][f] for m in methods})} |")
    return "\n".join(lines) + "\n"


def ranking(top1: dict[str, float | None], tie: float = 0.0005) -> str:
    """Methods by top-1, best first: "CP-ViT > ToMe = AP-ViT" (``=`` within ``tie``, i.e. 0.05 points);
    methods without a value are left out, "-" when none has one."""
    ranked = sorted(((v, m) for m, v in top1.items() if v is not None), reverse=True)
    if not ranked:
        return "-"
    text = NAMES.get(ranked[0][1], ranked[0][1])
    for (prev, _), (value, m) in zip(ranked, ranked[1:]):
        text += (" = " if prev - value < tie else " > ") + NAMES.get(m, m)
    return text


SEED_METHODS = ("p-vit", "ap-vit", "cp-vit")  # the methods of the seed's Table 1


def seed_table(rows: list[dict], seed: dict) -> str:
    """Markdown: the seed report's Table 1 (``seed``: ``prune`` of ``seed_numbers.yaml``) beside this
    sweep's top-1 at the same nominal ratios, each with its drop from its own base model in
    brackets (the seed pruned a 98% ViT-B/16, so the drops are what compares)."""
    base = _base(rows)
    get = _by_key(rows)
    seed_base = seed["base_top1"]["value"]
    head = " | ".join(f"{NAMES[m]} seed | {NAMES[m]} nnlab" for m in SEED_METHODS)
    lines = ["## Beside the seed report (top-1 %, drop from the base model in brackets)", "",
             seed["table1"]["source"] + ".", "", f"| ratio | {head} |", "|" + " --- |" * (1 + 2 * len(SEED_METHODS))]
    ours_base = 100 * base["top1"] if base else None
    lines.append("| 0 (base) | " + " | ".join(f"{seed_base:.2f} | " + ("-" if ours_base is None else f"{ours_base:.2f}")
                                               for _ in SEED_METHODS) + " |")
    for seed_row in seed["table1"]["rows"]:
        cells = []
        for m in SEED_METHODS:
            r = get.get((m, round(seed_row["ratio"], 4)))
            ours = "-" if r is None or ours_base is None else f"{100 * r['top1']:.2f} ({100 * r['top1'] - ours_base:+.2f})"
            cells.append(f"{seed_row[m]:.2f} ({seed_row[m] - seed_base:+.2f}) | {ours}")
        lines.append(f"| {seed_row['ratio']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path: str | Path, seed: dict | None = None) -> Path:
    """results.md: :func:`markdown_table`, :func:`equal_compute_table`, and with ``seed`` (the
    ``prune`` numbers of the seed report) :func:`seed_table`."""
    parts = [markdown_table(rows), equal_compute_table(rows), seed_table(rows, seed) if seed else ""]
    return atomic_write_text(path, "\n".join(p for p in parts if p))


def write_plots(rows: list[dict], out: str | Path) -> list[Path]:
    """``accuracy_vs_ratio.png`` (top-1 against the *achieved* ratio, so capped methods do not
    pretend to reach a target), ``accuracy_vs_gflops.png`` and ``accuracy_vs_throughput.png`` in
    ``out`` (one point per achieved ratio)."""
    from nnlab.report.figures import plt, save_figure

    out = Path(out)
    base = _base(rows)
    paths = []
    for x_key, name, label in (("achieved_ratio", "accuracy_vs_ratio.png", "pruning ratio (achieved)"),
                               ("gflops", "accuracy_vs_gflops.png", "GFLOPs per image (measured)"),
                               ("images_per_s", "accuracy_vs_throughput.png", "images / s (CPU, batch timing)")):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for m in _methods(rows):
            pts = curve(rows, m)  # connected in ratio order (timings are noisy)
            ax.plot([r[x_key] for r in pts], [100 * r["top1"] for r in pts], marker="o", ms=3, label=NAMES.get(m, m))
        if base:
            ax.axhline(100 * base["top1"], color="grey", lw=0.8, ls="--", label="base")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, out / name))
    return paths
