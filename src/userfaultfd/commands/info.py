"""What this machine offers: how a uffd can be created, features, ioctls, memory types."""

from __future__ import annotations

import errno
import mmap
import os
import platform
from typing import Any

from userfaultfd import _core
from userfaultfd.flags import MAP_HUGETLB, Feature, Ioctl, RegisterMode
from userfaultfd.tracking import probe
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd, _probe, available_features


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    return int(text) if text and text.isdigit() else None


def _try_create(create: Any, flags: int) -> dict[str, Any]:
    try:
        os.close(create(os.O_CLOEXEC | flags))
        return {"usable": True}
    except OSError as e:
        return {"usable": False, "why": e.strerror}


# Registering WP or MINOR on shared or huge pages needs these features requested; none of them
# makes munmap wait for an event nobody reads.
_MODE_FEATURES = (
    Feature.WP_HUGETLBFS_SHMEM | Feature.WP_UNPOPULATED | Feature.MINOR_SHMEM
    | Feature.MINOR_HUGETLBFS
)  # fmt: skip


def _register(flags: int, size: int, mode: RegisterMode) -> Ioctl:
    with Userfaultfd(available_features() & _MODE_FEATURES) as uffd:
        region = _core.Mapping(size, flags)
        try:
            return uffd.register(region.address, size, mode)
        finally:
            region.close()


def _register_modes(flags: int, size: int) -> tuple[RegisterMode, Ioctl]:
    """Every register mode this memory type accepts (each tried alone: one the kernel lacks
    fails the whole registration), and the ioctls offered on a range registered with them."""
    modes = RegisterMode.MISSING  # every type offers it: its failure is the type's failure
    ioctls = _register(flags, size, modes)
    for mode in (RegisterMode.WP, RegisterMode.MINOR):
        try:
            _register(flags, size, mode)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            modes |= mode
    if modes != RegisterMode.MISSING:
        ioctls = _register(flags, size, modes)
    return modes, ioctls


def _memory_types() -> dict[str, Any]:
    huge_total = _read_int("/proc/sys/vm/nr_hugepages") or 0
    types: dict[str, Any] = {}
    kinds = {
        "anonymous": (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, PAGE_SIZE),
        "shmem": (mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, PAGE_SIZE),
        "hugetlb": (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB, 2 << 20),
    }
    for name, (flags, size) in kinds.items():
        entry: dict[str, Any]
        try:
            modes, ioctls = _register_modes(flags, size)
            entry = {"usable": True, "ioctls": _names(ioctls), "modes": _names(modes)}
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
        "sysctl_unprivileged_userfaultfd": _read_int("/proc/sys/vm/unprivileged_userfaultfd"),
        "create": {
            "syscall": _try_create(_core.create, 0),
            "syscall_user_mode_only": _try_create(_core.create, 1),
            "device": _try_create(_core.create_dev, 0)
            if os.path.exists("/dev/userfaultfd")
            else {"usable": False, "why": "/dev/userfaultfd is missing"},
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
        text = "yes" if result["usable"] else f"no ({result['why']})"
        lines.append(f"create           {how:24} {text}")
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
        answers = ["yes" if v["usable"] else f"no ({v['why']})" for v in wp.values()]
        if len(set(answers)) == 1 and answers[0] != "yes":  # one reason for all
            text = answers[0]
        else:
            text = ", ".join(f"{k.upper()} {a}" for k, a in zip(wp, answers, strict=True))
        lines.append(f"write-protect {name:9} {text}")
    return "\n".join(lines)
