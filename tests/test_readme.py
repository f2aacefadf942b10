"""The README's commands must stay in step with the CLI: every `nnlab ...` line in its bash blocks
parses with the real parser, and its set-up block is what .ci/run executes."""
import re
import shlex

import pytest

from nnlab.cli import build_parser
from conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
COMMANDS = [line.split(" && ")[-1].strip() for block in BLOCKS for line in block.splitlines()
            if "nnlab " in line and not line.lstrip().startswith("#")]


def test_readme_starts_with_the_two_setup_commands():
    first = BLOCKS[0].strip().splitlines()
    assert len(first) == 2 and first[0].startswith("pip install -c constraints.txt")
    assert "nnlab reproduce" in first[0] and first[1] == "python -m pytest"
    assert README.index("```bash") < README.index("\n## ")  # before any other section


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    argv = shlex.split(command)
    argv = argv[argv.index("nnlab") + 1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of rejecting the line
        pytest.fail(f"README command does not parse ({exc.code}): {command}")
    assert callable(args.func)


def test_readme_lists_commands():
    assert len(COMMANDS) >= 10
