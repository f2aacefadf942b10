"""The docs follow the code: every module is in docs/architecture.md's file map, and the README's
first block holds the two set-up commands CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_in_the_file_map():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    file_map = doc[doc.index("## File map"):]
    src = ROOT / "src" / "nnlab"
    missing = [p.relative_to(src).as_posix() for p in sorted(src.rglob("*.py"))
               if f"`{p.relative_to(src).as_posix()}`" not in file_map]
    assert not missing, f"add these modules to the file map of docs/architecture.md: {missing}"
    listed = {line.split("`")[1] for line in file_map.splitlines() if line.startswith("- `")}
    gone = sorted(p for p in listed if not (src / p).is_file())
    assert not gone, f"the file map lists modules that no longer exist: {gone}"


def test_readme_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    assert lines[start + 1].startswith("pip install -c constraints.txt") and "nnlab reproduce" in lines[start + 1]
    assert lines[start + 2] == "python -m pytest" and lines[start + 3] == "```"
