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
    "restore-remote": "MB/s",
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
    remote = report["scenarios"]["restore-remote"]
    assert remote["cached_fault_ratio"] > 0 and remote["compression_ratio"] >= 1
    assert remote["dedup_ratio"] > 1
    m = report["machine"]
    assert m["cpus"] >= 1 and m["kernel_populate_MBps"] > 0 and m["kernel"]
    text = bench.render(report)
    assert "fault-thread" in text and "x " in text and "kernel populate rate" in text
    assert "ratio: ours / reference" in text


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
    assert proc.stderr == "userfaultfd bench: fault-sigbus done\n"  # progress, off stdout


def test_text_output_streams_each_scenario_as_it_finishes() -> None:
    """A header at once, a line per scenario as it ends (not a minute of silence), then the
    legend; --scenario takes a comma-separated list."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "bench", "--quick",
         "--scenario", "fault-sigbus,fault-thread"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("machine: Linux")
        assert proc.stdout.readline().startswith("scenario")
        assert proc.stdout.readline().startswith("fault-sigbus")
        assert proc.poll() is None  # fault-thread still runs: the line came before the end
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(60)
    assert "\nfault-thread " in rest and "ratio: ours / reference" in rest


def test_notes_warn_of_a_wide_spread_and_explain_restore_seq() -> None:
    scenario = {"ours": 3000.0, "reference": 1500.0, "unit": "MB/s", "ratio": 2.0, "runs": 3,
                "spread": {"ours": 0.4, "reference": 0.1}}  # fmt: skip
    report = {"scenarios": {"restore-seq": scenario}, "machine": {"kernel_populate_MBps": 2000.0}}
    notes = " ".join(bench.render_notes(report)).replace("\n  ", " ")
    assert "warning: restore-seq: the spread of ours is 40% (over 25%)" in notes
    assert "spread of reference" not in notes
    assert "restore-seq ran at 1.50x the kernel populate rate. It can exceed 1" in notes


def test_help_names_the_scenarios() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "bench", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    for name in bench.SCENARIOS:
        assert f"\n  {name} " in proc.stdout


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
