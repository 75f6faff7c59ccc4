"""The command line: the seed demo line by line, info, and every bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from userfaultfd import PAGE_SIZE, Feature, available_features

pytestmark = pytest.mark.needs_uffd


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The seed's printf formats (shared/seed/userfaultfd_demo.c), as patterns.
MMAP_LINE = re.compile(r"^Address returned by mmap\(\) = (0x[0-9a-f]+)$")
HANDLER = [
    re.compile(r"^$"),
    re.compile(r"^fault_handler_thread\(\):$"),
    re.compile(r"^    poll\(\) returns: nready = 1; POLLIN = 1; POLLERR = 0$"),
    re.compile(r"^    UFFD_EVENT_PAGEFAULT event: flags = 0; address = ([0-9a-f]+)$"),
    re.compile(r"^        \(uffdio_copy.copy returned 4096\)$"),
]
READ_LINE = re.compile(r"^Read address (0x[0-9a-f]+) in main\(\): ([A-Z])$")


@pytest.mark.parametrize("pages", [1, 3, 25])
def test_demo_output_matches_the_seed(pages: int) -> None:
    proc = run("demo", str(pages), "--delay", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.split("\n")
    assert lines[-1] == ""  # output ends with a newline
    lines = lines[:-1]
    base = int(MMAP_LINE.match(lines[0]).group(1), 16)  # type: ignore[union-attr]
    assert base % PAGE_SIZE == 0
    pos = 1
    reads_per_page = PAGE_SIZE // 1024
    for page in range(pages):
        for k, pattern in enumerate(HANDLER):
            m = pattern.match(lines[pos + k])
            assert m, f"line {pos + k}: {lines[pos + k]!r}"
            if k == 3:  # the exact fault address: the page's first read, at offset 0xf
                assert int(m.group(1), 16) == base + page * PAGE_SIZE + 0xF
        pos += len(HANDLER)
        for r in range(reads_per_page):
            m = READ_LINE.match(lines[pos])
            assert m, f"line {pos}: {lines[pos]!r}"
            assert int(m.group(1), 16) == base + page * PAGE_SIZE + r * 1024 + 0xF
            assert m.group(2) == chr(ord("A") + page % 20)
            pos += 1
    assert pos == len(lines)


def test_demo_default_delay_and_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "demo", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.count("Read address") == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "required: pages"),
        (["x"], "'x' is not a whole number"),
        (["0"], "'0' must be at least 1"),
        (["-3"], "'-3' must be at least 1"),
        (["99999999999999"], "is above the limit"),
        (["3", "4"], "unrecognized arguments: 4"),
        (["3", "--delay", "-1"], "'-1' must be a finite number >= 0"),
        (["3", "--delay", "soon"], "'soon' is not a number"),
        (["3", "--delay", "nan"], "'nan' must be a finite number"),
    ],
)
def test_demo_bad_input_gets_one_clear_line(args: list[str], message: str) -> None:
    proc = run("demo", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command_and_no_command() -> None:
    for args in (["frobnicate"], []):
        proc = run(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr


def test_info_text_and_json() -> None:
    text = run("info")
    assert text.returncode == 0, text.stderr
    assert "features" in text.stdout and "EXACT_ADDRESS" in text.stdout
    assert re.search(r"memory anonymous yes, MISSING\|WP", text.stdout)
    assert re.search(r"create +syscall +yes", text.stdout)
    report = json.loads(run("info", "--json").stdout)
    assert report["usable"] is True
    assert report["kernel"] and report["page_size"] == PAGE_SIZE
    assert {"syscall", "syscall_user_mode_only", "device"} <= set(report["create"])
    assert all(isinstance(c["usable"], bool) for c in report["create"].values())
    assert "SIGBUS" in report["features"] and "API" in report["api_ioctls"]
    assert report["memory"]["anonymous"]["usable"] is True
    assert "COPY" in report["memory"]["anonymous"]["ioctls"]
    if "PAGEFAULT_FLAG_WP" in report["features"]:  # not MISSING only
        assert report["memory"]["anonymous"]["modes"] == ["MISSING", "WP"]
        assert "WRITEPROTECT" in report["memory"]["anonymous"]["ioctls"]
    assert (
        report["memory"]["shmem"]["usable"] is True
        and "CONTINUE" in report["memory"]["shmem"]["ioctls"]
    )
    assert isinstance(report["memory"]["hugetlb"]["reserved_huge_pages"], int)
    assert report["sysctl_unprivileged_userfaultfd"] in (0, 1)


def test_info_reports_write_protection_per_memory_type() -> None:
    text = run("info").stdout
    assert re.search(r"write-protect anonymous +WP yes", text)
    report = json.loads(run("info", "--json").stdout)["write_protect"]
    assert set(report) == {"anonymous", "shmem", "hugetlb", "file"}
    assert report["anonymous"]["wp"] == {"usable": True}
    if available_features() & Feature.WP_ASYNC:
        assert report["anonymous"]["wp_async"] == report["anonymous"]["pagemap_scan"]
        assert report["anonymous"]["pagemap_scan"] == {"usable": True}
        assert report["file"]["wp_async"] == {"usable": True}  # WP_ASYNC takes any memory
    assert all(set(v) == {"wp", "wp_async", "pagemap_scan"} for v in report.values())
    assert all(isinstance(a["usable"], bool) for v in report.values() for a in v.values())


def test_a_bare_command_line_names_the_commands_and_version_answers() -> None:
    proc = run()
    assert proc.returncode == 2
    assert "required: {demo,info,serve,bench,ws," in proc.stderr, proc.stderr
    proc = run("--version")
    assert proc.returncode == 0 and re.fullmatch(r"userfaultfd \d+\.\d+\.\d+\n", proc.stdout)
