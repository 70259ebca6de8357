"""Lint, format and type checks, run by the test suite so CI enforces them (settings: pyproject.toml).

Fails with the tools' own output. To fix locally: ``.venv/bin/ruff check --fix .``,
``.venv/bin/ruff format .`` and ``.venv/bin/mypy``; see the README's Development section.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the tools of the test extra, installed beside this interpreter

# ruff covers the whole tree (its configuration excludes nothing of ours); mypy the two packages that
# ship as the product and the library (the tests, benchmarks and training code are not type-checked)
RUFF_TARGETS = ["."]
MYPY_TARGETS = ["fastcache_core", "service"]


def run_tool(tool: str, *args: str) -> None:
    executable = BIN / tool
    if not executable.exists():
        pytest.fail(f"{executable} is missing: install the test extra (scripts/setup.sh)")
    # a first mypy run (no .mypy_cache) reads torch and diffusers: about a minute on 2 cores
    done = subprocess.run([str(executable), *args], cwd=REPO, capture_output=True, text=True, timeout=540)
    if done.returncode != 0:
        command = " ".join([tool, *args])
        pytest.fail(f"`{command}` exited {done.returncode}:\n{done.stdout}{done.stderr}", pytrace=False)


def test_ruff_finds_no_lint_problems():
    run_tool("ruff", "check", "--output-format=concise", *RUFF_TARGETS)


def test_the_code_is_formatted_by_ruff():
    run_tool("ruff", "format", "--check", *RUFF_TARGETS)


def test_mypy_finds_no_type_errors():
    run_tool("mypy", *MYPY_TARGETS)
