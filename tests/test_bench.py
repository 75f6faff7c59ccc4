"""The benchmark harness: a tiny run, the JSON schema, a missing compiler. Not timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from userfaultfd.commands import bench

pytestmark = pytest.mark.needs_uffd
TINY = bench.Size(pages=64, file_bytes=4 << 20, runs=2)
UNITS = {
    "restore-seq": "MB/s",
    "readahead-seq": "MB/s",
    "restore-ws": "pages/s",
    "dirty-scan": "scans/s",
    "write-cost": "writes/s",
    "live-snapshot": "writes/s",
}


def check_scenario(s: dict[str, object]) -> None:
    assert set(s) >= {"ours", "reference", "unit", "ratio", "runs", "spread"}
    ours, reference, ratio = s["ours"], s["reference"], s["ratio"]
    assert isinstance(ours, float) and isinstance(reference, float) and ours > 0 and reference > 0
    assert ratio == pytest.approx(ours / reference)
    assert s["runs"] == TINY.runs
    assert set(s["spread"]) == {"ours", "reference"}  # type: ignore[arg-type]


def test_tiny_run_of_every_scenario() -> None:
    report = bench.run(list(bench.SCENARIOS), TINY)
    assert set(report["scenarios"]) == set(bench.SCENARIOS)
    for name, s in report["scenarios"].items():
        check_scenario(s)
        assert s["unit"] == UNITS.get(name, "faults/s")
    assert report["scenarios"]["live-snapshot"]["stall_fraction"] > 0
    assert report["scenarios"]["fault-sigbus"]["c_sigbus_resolver"]["value"] > 0
    assert report["scenarios"]["fault-thread"]["ours_without_spinning"]["value"] > 0
    ws = report["scenarios"]["restore-ws"]
    assert ws["resident"] > 0 and ws["wrong_set"] > 0 and 0 <= ws["demand_fault_fraction"] <= 1
    assert ws["resident"] == pytest.approx(ws["resident_walk"]["value"] / ws["ours"])
    m = report["machine"]
    assert m["cpus"] >= 1 and m["kernel_populate_MBps"] > 0 and m["kernel"]
    text = bench.render(report)
    assert "fault-thread" in text and "x " in text and "kernel populate rate" in text


def test_cli_json_and_scenario_selection() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "bench", "--quick", "--json",
         "--scenario", "fault-sigbus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert list(report["scenarios"]) == ["fault-sigbus"]
    assert report["scenarios"]["fault-sigbus"]["runs"] == bench.QUICK.runs


def test_unknown_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "bench", "--scenario", "warp-drive"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown scenario 'warp-drive'" in proc.stderr and "fault-thread" in proc.stderr


def test_missing_compiler_is_a_clear_message(tmp_path: object) -> None:
    env = dict(os.environ, PATH=str(tmp_path), CC="no-such-cc")
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "bench", "--quick", "--scenario", "fault-thread"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "userfaultfd bench: error: no C compiler found: install gcc (apt-get install gcc) or set CC"
    )
