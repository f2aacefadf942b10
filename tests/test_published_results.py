"""The published results (``docs/results/<preset>/``, a copied ``nnlab reproduce`` report): every
image and link resolves inside the folder, every stage finished, and each study has a section."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO

RESULTS = REPO / "docs" / "results"
PUBLISHED = sorted(p.parent for p in RESULTS.glob("*/summary.json")) if RESULTS.is_dir() else []


@pytest.mark.skipif(not PUBLISHED, reason="no published report under docs/results")
@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_report_is_complete_and_self_contained(folder: Path):
    md, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    refs = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", md) + re.findall(r"(?:src|href)='([^']+)'", page)
    local = [r for r in refs if not r.startswith(("http://", "https://", "#", "mailto:"))]
    assert local, "the report references no figures or tables"
    missing = sorted({r for r in local if not (folder / r).is_file()})
    assert not missing, f"broken references in {folder.name}: {missing[:5]}"
    summary = json.loads((folder / "summary.json").read_text())
    unfinished = [s["name"] for s in summary["stages"] if s["status"] not in ("done", "reused")]
    assert not unfinished, f"stages that did not finish: {unfinished}"
    assert set(summary["headline"]) == {"functa", "vit", "bn", "lbi"}
