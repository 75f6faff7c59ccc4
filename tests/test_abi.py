"""Every number the project defines, checked against shared/reference/userfaultfd-abi.md (or
the copy kept in tests/data when the shared tree is not beside the checkout)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from userfaultfd import _core, flags
from userfaultfd.events import MSG_SIZE

# The shared reference when it sits beside the checkout; else the copy kept with the tests.
SHARED = next(
    (
        p / "shared/reference/userfaultfd-abi.md"
        for p in Path(__file__).resolve().parents
        if (p / "shared/reference/userfaultfd-abi.md").exists()
    ),
    None,
)
COPY = Path(__file__).with_name("data") / "userfaultfd-abi.md"
REFERENCE = SHARED or COPY


@pytest.mark.skipif(SHARED is None, reason="shared/reference is not beside the checkout")
def test_the_copy_of_the_reference_is_current() -> None:
    assert SHARED is not None
    assert COPY.read_text() == SHARED.read_text(), f"refresh {COPY} from {SHARED}"


@pytest.fixture(scope="module")
def text() -> str:
    return REFERENCE.read_text()


def test_ioctl_numbers(text: str) -> None:
    rows = re.findall(
        r"^\| `(\w+)`[^|]*\|[^|]*\| (0x[0-9A-F]+) \| \d+ \| `(0x[0-9A-F]+)` \|", text, re.M
    )
    table = {name: int(value, 16) for name, _, value in rows}
    names = [
        "UFFDIO_API",
        "UFFDIO_REGISTER",
        "UFFDIO_UNREGISTER",
        "UFFDIO_WAKE",
        "UFFDIO_COPY",
        "UFFDIO_ZEROPAGE",
        "UFFDIO_MOVE",
        "UFFDIO_WRITEPROTECT",
        "UFFDIO_CONTINUE",
        "UFFDIO_POISON",
        "USERFAULTFD_IOC_NEW",
    ]
    for name in names:
        assert _core.ABI[name] == table[name], name
    nrs = {name: int(nr, 16) for name, nr, _ in rows}
    for member in flags.Ioctl:
        if member.name != "API":
            assert member.value == 1 << nrs[f"UFFDIO_{member.name}"], member
    assert flags.Ioctl.API == 1 << 0x3F


def test_syscall_and_api(text: str) -> None:
    assert re.search(r"__NR_userfaultfd = (\d+)", text).group(1) == str(_core.ABI["NR_userfaultfd"])  # type: ignore[union-attr]
    assert _core.ABI["UFFD_API"] == flags.UFFD_API == 0xAA
    assert flags.USER_MODE_ONLY == 1


def test_feature_bits(text: str) -> None:
    rows = re.findall(r"^\| (\d+) \| `UFFD_FEATURE_(\w+)`", text, re.M)
    assert len(rows) == 17
    for bit, name in rows:
        assert flags.Feature[name] == 1 << int(bit), name
    assert sum(flags.Feature) == 0x1FFFF


def test_mode_flags_and_events(text: str) -> None:
    modes = dict(re.findall(r"`UFFDIO_REGISTER_MODE_(\w+)` \| 1<<(\d)", text))
    for name, bit in modes.items():
        assert flags.RegisterMode[name] == 1 << int(bit)
    for name, value in re.findall(r"`UFFD_EVENT_(\w+) (0x[0-9a-f]+)`", text):
        assert flags.EventCode[name] == int(value, 16)
    for name, bit in re.findall(r"`UFFD_PAGEFAULT_FLAG_(\w+)` 1<<(\d)", text):
        assert flags.PageFaultFlag[name] == 1 << int(bit)
    assert "`UFFDIO_COPY_MODE_WP` | 1<<1" in text and flags.COPY_MODE_WP == 2
    assert (
        "`UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES` | 1<<1" in text and flags.MOVE_MODE_ALLOW_SRC_HOLES == 2
    )
    assert (
        "`UFFDIO_WRITEPROTECT_MODE_DONTWAKE` | 1<<1" in text
        and flags.WRITEPROTECT_MODE_DONTWAKE == 2
    )


def test_message_layout(text: str) -> None:
    assert "`struct uffd_msg` — 32 bytes" in text
    assert MSG_SIZE == _core.ABI["sizeof_uffd_msg"] == 32


def test_unknown_kernel_bits_are_kept() -> None:
    assert int(flags.Ioctl(0x8000000000000003 | 1 << 40)) == 0x8000000000000003 | 1 << 40
    assert int(flags.Feature(1 << 30)) == 1 << 30


def test_write_protect_extras(text: str) -> None:
    row = re.search(
        r"^\| `PAGEMAP_SCAN`[^|]*\|[^|]*\| 16 \| (\d+) \| `(0x[0-9A-F]+)` \|", text, re.M
    )
    assert row is not None
    assert _core.ABI["PAGEMAP_SCAN"] == int(row.group(2), 16)
    assert _core.ABI["sizeof_pm_scan_arg"] == int(row.group(1)) == 96
    assert re.search(r"`page_region` \| 24 \|", text) and _core.ABI["sizeof_page_region"] == 24
    assert re.search(r"`pm_scan_arg` \| 96 \|", text)
    assert "`PM_SCAN_WP_MATCHING` 1<<0" in text and _core.ABI["PM_SCAN_WP_MATCHING"] == 1
    assert "`PM_SCAN_CHECK_WPASYNC` 1<<1" in text and _core.ABI["PM_SCAN_CHECK_WPASYNC"] == 2
    assert "`PAGE_IS_WRITTEN` 1<<1" in text and _core.ABI["PAGE_IS_WRITTEN"] == 2
    assert "`UFFDIO_COPY_MODE_WP` | 1<<1" in text and _core.ABI["UFFDIO_COPY_MODE_WP"] == 2
    assert _core.ABI["UFFD_FEATURE_WP_ASYNC"] == flags.Feature.WP_ASYNC
    assert _core.ABI["UFFD_FEATURE_WP_UNPOPULATED"] == flags.Feature.WP_UNPOPULATED
