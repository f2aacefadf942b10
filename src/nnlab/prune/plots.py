"""Tables and plots of a sweep, built from the rows of ``results.csv``."""
from __future__ import annotations

from pathlib import Path

from nnlab.engine.io import atomic_write_text

ORDER = ["p-vit", "ap-vit", "cp-vit", "tome"]
NAMES = {"p-vit": "P-ViT", "ap-vit": "AP-ViT", "cp-vit": "CP-ViT", "tome": "ToMe"}


def _methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows} - {"base"}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def markdown_table(rows: list[dict]) -> str:
    """Table 1 of the seed: one row per ratio, top-1 / top-5 per method; then cost per method."""
    methods = _methods(rows)
    base = next((r for r in rows if r["method"] == "base"), None)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "base"})
    get = {(r["method"], round(r["ratio"], 4)): r for r in rows}
    head = "| ratio | " + " | ".join(f"{NAMES.get(m, m)} top-1 | {NAMES.get(m, m)} top-5" for m in methods) + " |"
    lines = ["## Accuracy (%)", "", head, "|" + " --- |" * (1 + 2 * len(methods))]
    if base:
        lines.append("| 0 (base) | " + " | ".join(f"{base['top1']:.2f} | {base['top5']:.2f}" for _ in methods) + " |")
    for ratio in ratios:
        cells = []
        for m in methods:
            r = get.get((m, round(ratio, 4)))
            cells.append(f"{r['top1']:.2f} | {r['top5']:.2f}" if r else "- | -")
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost: GFLOPs (1e9 MACs) per image / images per s (batch timing) / achieved ratio", "",
              "| ratio | " + " | ".join(NAMES.get(m, m) for m in methods) + " |", "|" + " --- |" * (1 + len(methods))]
    if base:
        lines.append("| 0 (base) | " + " | ".join(f"{base['gflops']:.4f} / {base['images_per_s']:.0f} / 0"
                                                   for _ in methods) + " |")
    for ratio in ratios:
        cells = []
        for m in methods:
            r = get.get((m, round(ratio, 4)))
            cells.append(f"{r['gflops']:.4f} / {r['images_per_s']:.0f} / {r['achieved_ratio']:.2f}" if r else "-")
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path: str | Path) -> Path:
    return atomic_write_text(path, markdown_table(rows))


def write_plots(rows: list[dict], out: str | Path) -> list[Path]:
    """``accuracy_vs_ratio.png`` (top-1 against the *achieved* ratio, so capped methods do not
    pretend to reach a target) and ``accuracy_vs_throughput.png`` in ``out``."""
    from nnlab.report.figures import plt, save_figure

    out = Path(out)
    base = next((r for r in rows if r["method"] == "base"), None)
    paths = []
    for x_key, name, label in (("achieved_ratio", "accuracy_vs_ratio.png", "pruning ratio (achieved)"),
                               ("images_per_s", "accuracy_vs_throughput.png", "images / s (CPU, batch timing)")):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for m in _methods(rows):
            pts = [r for r in rows if r["method"] == m] + ([base] if base else [])
            pts.sort(key=lambda r: r["ratio"])  # connect in ratio order (timings are noisy)
            ax.plot([r[x_key] for r in pts], [r["top1"] for r in pts], marker="o", ms=3, label=NAMES.get(m, m))
        if base:
            ax.axhline(base["top1"], color="grey", lw=0.8, ls="--", label="base")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, out / name))
    return paths
