"""The Python layer type-checks under mypy --strict and is clean under ruff; the C layer is
clang-formatted and keeps Python objects out of GIL-released sections."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> None:
    if (
        shutil.which(name) is None
        and subprocess.run(
            [sys.executable, "-m", name, "--version"], capture_output=True
        ).returncode
    ):
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")


def test_mypy_strict() -> None:
    tool("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    tool("ruff")
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "src", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


NATIVE = ROOT / "src/userfaultfd/_native"


def test_no_python_api_between_allow_threads() -> None:
    """Nothing between Py_BEGIN_ALLOW_THREADS and Py_END_ALLOW_THREADS touches a Python object, in
    every C file of the native core."""
    sections = [
        (path.name, body)
        for path in sorted(NATIVE.glob("*.[ch]"))
        for body in re.findall(
            r"Py_BEGIN_ALLOW_THREADS(.*?)Py_END_ALLOW_THREADS", path.read_text(), re.S
        )
    ]
    assert sections
    for name, body in sections:
        assert not re.search(r"\bPy[A-Z_]\w*\(|\b_Py\w*\(", body), f"{name}: {body}"


def test_c_files_are_clang_formatted() -> None:
    """Every C file of the native core is as the committed .clang-format writes it."""
    if shutil.which("clang-format") is None:
        pytest.skip("clang-format is not installed (apt-get install clang-format)")
    files = sorted(str(path) for path in NATIVE.glob("*.[ch]"))
    proc = subprocess.run(
        ["clang-format", "--dry-run", "-Werror", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
