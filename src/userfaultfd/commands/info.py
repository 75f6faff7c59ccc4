"""What this machine offers: how a uffd can be created, features, ioctls, memory types."""

from __future__ import annotations

import mmap
import os
import platform
from typing import Any

from userfaultfd import _core
from userfaultfd.flags import MAP_HUGETLB, Feature, Ioctl, RegisterMode
from userfaultfd.tracking import probe
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd, _probe


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _try_create(create: Any, flags: int) -> str:
    try:
        os.close(create(os.O_CLOEXEC | flags))
        return "yes"
    except OSError as e:
        return f"no ({e.strerror})"


def _memory_types() -> dict[str, Any]:
    huge_total = int(_read("/proc/sys/vm/nr_hugepages") or "0")
    types: dict[str, Any] = {}
    kinds = {
        "anonymous": (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, PAGE_SIZE, RegisterMode.MISSING),
        "shmem": (
            mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
            PAGE_SIZE,
            RegisterMode.MISSING | RegisterMode.MINOR,
        ),
        "hugetlb": (
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
            2 << 20,
            RegisterMode.MISSING,
        ),
    }
    for name, (flags, size, mode) in kinds.items():
        entry: dict[str, Any] = {}
        try:
            with Userfaultfd() as uffd:
                region = _core.Mapping(size, flags)
                try:
                    entry["usable"] = True
                    entry["ioctls"] = _names(uffd.register(region.address, size, mode))
                    entry["modes"] = _names(RegisterMode(mode))
                finally:
                    region.close()
        except OSError as e:
            entry = {"usable": False, "why": e.strerror}
        if name == "hugetlb":
            entry["reserved_huge_pages"] = huge_total
        types[name] = entry
    return types


def _names(flags: Any) -> list[str]:
    return [m.name for m in type(flags) if m.name and m in flags]


def gather() -> dict[str, Any]:
    """The report as a plain dict (what ``userfaultfd info --json`` prints)."""
    report: dict[str, Any] = {
        "kernel": platform.release(),
        "page_size": PAGE_SIZE,
        "sysctl_unprivileged_userfaultfd": _read("/proc/sys/vm/unprivileged_userfaultfd"),
        "create": {
            "syscall": _try_create(_core.create, 0),
            "syscall_user_mode_only": _try_create(_core.create, 1),
            "device": _try_create(_core.create_dev, 0)
            if os.path.exists("/dev/userfaultfd")
            else "no (/dev/userfaultfd is missing)",
        },
    }
    try:
        features, ioctls, how, umo = _probe()
    except OSError as e:
        report["usable"] = False
        report["why"] = str(e)
        return report
    report.update(
        usable=True,
        created_by=how + (" (user-mode-only)" if umo else ""),
        features=_names(Feature(features)),
        features_hex=hex(features),
        api_ioctls=_names(Ioctl(ioctls)),
        memory=_memory_types(),
        write_protect={kind: probe(kind) for kind in ("anonymous", "shmem", "hugetlb", "file")},
    )
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"kernel           {report['kernel']} (page size {report['page_size']})"]
    sysctl = report["sysctl_unprivileged_userfaultfd"]
    lines.append(f"sysctl           vm.unprivileged_userfaultfd = {sysctl}")
    for how, result in report["create"].items():
        lines.append(f"create           {how:24} {result}")
    if not report["usable"]:
        lines.append(f"usable           no: {report['why']}")
        return "\n".join(lines)
    lines.append(f"usable           yes, via {report['created_by']}")
    lines.append(f"features         {report['features_hex']}: {' '.join(report['features'])}")
    lines.append(f"api ioctls       {' '.join(report['api_ioctls'])}")
    for name, entry in report["memory"].items():
        if entry["usable"]:
            text = f"yes, {'|'.join(entry['modes'])} -> {' '.join(entry['ioctls'])}"
        else:
            text = f"no ({entry['why']})"
        if "reserved_huge_pages" in entry:
            text += f"; {entry['reserved_huge_pages']} huge pages reserved"
        lines.append(f"memory {name:9} {text}")
    for name, wp in report["write_protect"].items():
        if len(set(wp.values())) == 1 and "yes" not in wp.values():  # one reason for all
            text = next(iter(wp.values()))
        else:
            text = ", ".join(f"{k.upper()} {v}" for k, v in wp.items())
        lines.append(f"write-protect {name:9} {text}")
    return "\n".join(lines)
