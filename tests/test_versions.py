"""The Python floor in pyproject.toml is the one the sources need: vermin reads every source file
for syntax, modules and members newer than it (e.g. datetime.UTC, new in 3.11)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FLOOR = re.search(r'^requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text(),
                  re.M).group(1)


def vermin(*paths):
    """vermin's command-line script, installed beside this Python (it has no `python -m` entry)."""
    command = [Path(sys.executable).with_name("vermin"), "--no-tips", "--violations",
               "--eval-annotations", f"-t={FLOOR}-", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_sources_need_no_python_newer_than_the_declared_floor():
    sources = [path for path in ROOT.rglob("*.py")
               if not {".venv", ".git"} & set(path.relative_to(ROOT).parts)]
    assert len(sources) > 20
    result = vermin(*sources)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_catches_a_newer_member(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("from datetime import UTC\n")
    result = vermin(newer)
    assert result.returncode != 0 and "datetime.UTC" in result.stdout
