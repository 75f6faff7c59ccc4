"""``userfaultfd snapshot push|ls|info|pull|rm|gc``: the snapshot store from the command line.
Thin: parse, call userfaultfd.store, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text: str) -> int:
    """Plain bytes, or a whole number with a K, M or G suffix (powers of 1024)."""
    mult = SUFFIXES.get(text[-1:].upper(), 1)
    digits = text[:-1] if mult > 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K/M/G)")
    return int(digits) * mult


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="the snapshot store: push, ls, info, pull, rm, gc")
    cmds = p.add_subparsers(dest="snapshot_command", required=True, parser_class=type(p))

    c = cmds.add_parser("push", help="store a memory file as a snapshot")
    c.add_argument("memfile", metavar="MEMFILE")
    c.add_argument("address", metavar="ADDRESS", help="file:///DIR/NAME or s3://BUCKET/.../NAME")
    c.add_argument("--parent", metavar="NAME", help="store a diff layer over this snapshot")
    c.add_argument("--chunk-size", type=size, metavar="BYTES", help="default 256K")
    c.add_argument("--level", type=int, default=3, metavar="N", help="zstd level (default 3)")
    c.add_argument(
        "--sparse-diff",
        action="store_true",
        help="MEMFILE is a Firecracker diff snapshot: its holes are pages unchanged since --parent",
    )

    c = cmds.add_parser("ls", help="the snapshots in a store")
    c.add_argument("store", metavar="STORE")
    c.add_argument("--json", action="store_true")

    c = cmds.add_parser("info", help="a snapshot's size, layers, chunks and compression")
    c.add_argument("address", metavar="ADDRESS")
    c.add_argument("--json", action="store_true")

    c = cmds.add_parser("pull", help="materialise a snapshot into a plain memory file")
    c.add_argument("address", metavar="ADDRESS")
    c.add_argument("outfile", metavar="OUTFILE")

    c = cmds.add_parser("rm", help="remove a snapshot (gc deletes its chunks)")
    c.add_argument("address", metavar="ADDRESS")

    c = cmds.add_parser("gc", help="delete chunks no snapshot references")
    c.add_argument("store", metavar="STORE")
    c.add_argument(
        "--grace",
        type=seconds,
        default=3600.0,
        metavar="SECONDS",
        help="keep unreferenced chunks younger than this (default 3600)",
    )
    p.set_defaults(func=main)


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """`serve --memory ADDRESS`: the chunk cache's bound and the fetches' deadline; and for a
    handler process started by an application (SnapshotStore.map): --exit-with."""
    p.add_argument(
        "--cache-size",
        type=size,
        default=1 << 30,
        metavar="BYTES",
        help="memory for chunks of a stored snapshot (default 1G)",
    )
    p.add_argument(
        "--fetch-timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="a chunk not fetched by then (retries included) is poisoned (default 30)",
    )
    # --quiet (log problems only), used by SnapshotStore.map's handler process: serve's own.
    p.add_argument("--exit-with", type=int, metavar="PID", help="stop once this process has ended")


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on a terminal; nothing otherwise (the caller prints a summary)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what) as bar:

        def advance(n: int) -> None:
            bar.update(n)

        yield advance


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main(args: argparse.Namespace) -> int:
    import os

    from ..store import SnapshotStore

    cmd = args.snapshot_command
    if cmd in ("ls", "gc"):
        store = SnapshotStore(args.store)
    else:
        store, name = SnapshotStore.at(args.address)
    if cmd == "push":
        total = os.stat(args.memfile).st_size
        with _progress(total, "push") as progress:
            r = store.push(
                args.memfile,
                name,
                parent=args.parent,
                chunk_size=args.chunk_size,
                level=args.level,
                sparse_diff=args.sparse_diff,
                progress=progress,
            )
        print(
            f"pushed {args.address}: {_mib(r.size)} in {r.chunks} chunks ({r.zero_chunks} zero, "
            f"{r.inherited_chunks} as in the parent, {r.new_chunks} distinct), "
            f"{_mib(r.stored_bytes)} added to the store in {r.seconds:.1f} s"
        )
    elif cmd == "ls":
        names = store.names()
        print(json.dumps(names) if args.json else "\n".join(names))
    elif cmd == "info":
        info = store.info(name)
        if args.json:
            print(json.dumps(info))
        else:
            for key, value in info.items():
                print(f"{key}: {value}")
    elif cmd == "pull":
        total = store.info(name)["size"]
        with _progress(total, "pull") as progress:
            n = store.pull(name, args.outfile, progress=progress)
        print(f"pulled {args.address} into {args.outfile}: {_mib(n)}")
    elif cmd == "rm":
        store.remove(name)
        print(f"removed {args.address}")
    else:
        g = store.gc(args.grace)
        print(
            f"gc {args.store}: deleted {g.deleted} chunks ({_mib(g.deleted_bytes)}), kept {g.kept}"
        )
    return 0
