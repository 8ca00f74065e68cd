"""`make lint`'s duplicate-code check, run by the suite too, so CI refuses a change that copies a
block of six or more lines between modules (pylint R0801; imports, comments, docstrings and
signatures ignored; settings in pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def checked_dirs() -> list[str]:
    """The directories `make duplicates` checks, read from the Makefile (one list, not two)."""
    line = re.search(r"^DUP_DIRS\s*:=\s*\$\(wildcard ([^)]*)\)", (REPO / "Makefile").read_text(), re.M)
    assert line, "Makefile: DUP_DIRS not found"
    return [d for d in line.group(1).split() if (REPO / d).is_dir()]


def test_the_check_covers_the_code_and_the_tests() -> None:
    assert {"recstack", "services", "feature_store", "models", "loadtests", "benchmarks", "tests"} <= set(
        checked_dirs()
    )


def test_no_block_of_six_lines_is_repeated_between_modules() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pylint", "--rcfile=pyproject.toml", "--score=n", *checked_dirs()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (
        f"pylint duplicate-code found repeated blocks:\n{run.stdout[-6000:]}{run.stderr[-2000:]}"
    )
