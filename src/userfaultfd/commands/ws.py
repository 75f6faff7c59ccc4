"""``userfaultfd ws show|merge|plot``: inspect, combine and draw working-set files."""

from __future__ import annotations

import argparse
import json
from typing import Any

from userfaultfd.working_set import VERSION, WorkingSet

PLOT_EXTRA = "userfaultfd[plot]"


def summary(path: str, ws: WorkingSet) -> dict[str, Any]:
    lengths = [length for _, length in ws]
    return {
        "path": path,
        "version": VERSION,
        "page_size": ws.page_size,
        "memory_size": ws.memory_size,
        "pages": len(ws),
        "bytes": ws.nbytes,
        "runs": len(lengths),
        "longest_run_bytes": max(lengths, default=0),
        "duration_s": ws.duration_ns / 1e9,
    }


def render(s: dict[str, Any]) -> str:
    share = s["bytes"] / s["memory_size"] * 100 if s["memory_size"] else 0.0
    mean = s["pages"] / s["runs"] if s["runs"] else 0.0
    return "\n".join(
        [
            f"{s['path']}: working set, format version {s['version']}",
            f"  pages     {s['pages']:,} x {s['page_size']:,} bytes = {s['bytes']:,} bytes "
            f"({share:.1f}% of {s['memory_size']:,} bytes of memory)",
            f"  runs      {s['runs']:,} (mean {mean:.1f} pages, longest "
            f"{s['longest_run_bytes'] // s['page_size'] if s['page_size'] else 0:,})",
            f"  duration  {s['duration_s']:.3f} s from the first touch to the last",
        ]
    )


def cmd_show(args: argparse.Namespace) -> int:
    s = summary(args.path, WorkingSet.load(args.path))
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    sets = [WorkingSet.load(p) for p in args.paths]
    if args.min_count > len(sets):
        raise ValueError(f"--min-count {args.min_count} is more than the {len(sets)} files given")
    merged = WorkingSet.merge(sets, min_count=args.min_count)
    merged.save(args.output)
    print(render(summary(args.output, merged)))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    ws = WorkingSet.load(args.path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            f"plotting needs matplotlib: pip install '{PLOT_EXTRA}' (or pip install matplotlib)"
        ) from None
    mib = 1 << 20
    times = [ns / 1e6 for _, ns in ws.pages()]
    offsets = [o / mib for o, _ in ws.pages()]
    fig, (when, spread) = plt.subplots(
        1, 2, figsize=(11, 5), sharey=True, gridspec_kw={"width_ratios": [3, 1]}
    )
    when.scatter(times, offsets, s=2, c=range(len(times)), cmap="viridis", linewidths=0)
    when.set_xlabel("first touch (ms since the start)")
    when.set_ylabel("offset in memory (MiB)")
    when.set_ylim(0, max(ws.memory_size / mib, 1e-3))
    when.set_title("where and when pages were first touched (colour: order)")
    bins = min(200, max(1, ws.memory_size // (ws.page_size * 64)))
    spread.hist(offsets, bins=bins, range=(0, ws.memory_size / mib), orientation="horizontal")
    spread.set_xlabel("pages per bin")
    spread.set_title("spread over the memory")
    s = summary(args.path, ws)
    fig.suptitle(
        f"{args.path}: {s['pages']:,} pages ({s['bytes'] / mib:.1f} MiB of "
        f"{s['memory_size'] / mib:.0f} MiB) in {s['runs']:,} runs over {s['duration_s']:.2f} s"
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output}")
    return 0


def add_parser(sub: Any) -> None:
    """Adds ``ws`` and its subcommands to the top-level subparsers ``sub``."""
    p = sub.add_parser("ws", help="working-set files: show, merge, plot")
    cmds = p.add_subparsers(dest="ws_command", required=True, parser_class=type(p))

    c = cmds.add_parser("show", help="pages, bytes, runs, memory size, duration")
    c.add_argument("path", metavar="PATH")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_show)

    c = cmds.add_parser("merge", help="combine recordings into one set")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("-o", "--output", required=True, metavar="OUT")
    c.add_argument(
        "--min-count",
        type=int,
        default=1,
        metavar="K",
        help="keep pages seen in at least K recordings (default 1)",
    )
    c.set_defaults(func=cmd_merge)

    c = cmds.add_parser("plot", help=f"a PNG of where and when pages were touched ({PLOT_EXTRA})")
    c.add_argument("path", metavar="PATH")
    c.add_argument("-o", "--output", required=True, metavar="FILE.png")
    c.set_defaults(func=cmd_plot)
