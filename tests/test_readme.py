"""The README's examples run as written (and end, instead of deadlocking)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import run_child

README = (Path(__file__).parent.parent / "README.md").read_text()


def example_after(marker: str) -> str:
    """The first python code block after marker in the README."""
    m = re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, re.DOTALL)
    assert m, f"no python example after {marker!r} in README.md"
    return m.group(1)


@pytest.mark.needs_uffd
@pytest.mark.kernel_faults
def test_the_low_level_example_runs_without_deadlock() -> None:
    proc = run_child(example_after("**Low level**"))  # bounded: a deadlock is a timeout
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "b'xxxx'\n"
