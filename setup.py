"""Builds the native core. UFFD_DEBUG=1 builds with -O0 -g; UFFD_SANITIZE=1 with ASan and UBSan."""

import os
from pathlib import Path

from setuptools import Extension, setup

cflags = [
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
]
ldflags: list[str] = []
if os.environ.get("UFFD_DEBUG"):
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O2"]
if os.environ.get("UFFD_SANITIZE"):
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    ldflags += ["-fsanitize=address,undefined"]

native = "src/userfaultfd/_native"
setup(
    ext_modules=[
        Extension(
            "userfaultfd._core",
            sources=sorted(str(path) for path in Path(native).glob("*.c")),
            depends=sorted(str(path) for path in Path(native).glob("*.h")),
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            libraries=["pthread"],
        )
    ]
)
