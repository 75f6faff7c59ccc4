"""The command line: ``userfaultfd demo|info|serve|bench|ws``. Thin: parse, call the library,
print."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """Bad input gets one line on stderr and exit status 2, never a usage dump or a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _page_count(text: str) -> int:
    from .demo import MAX_PAGES

    value = _positive_int(text)
    if value > MAX_PAGES:
        raise argparse.ArgumentTypeError(f"{text!r} is above the limit of {MAX_PAGES} pages")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args.pages, args.delay)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    report = info.gather()
    print(json.dumps(report, indent=2) if args.json else info.render(report))
    return 0 if report["usable"] else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import serve

    if args.record_seconds is not None and not args.record:
        raise ValueError("--record-seconds needs --record PATH")
    if args.replay_threads != 1 and not args.replay:
        raise ValueError("--replay-threads needs --replay PATH")
    if args.record:  # the set is written after the restore: a bad path would lose it then
        folder = os.path.dirname(os.path.abspath(args.record))
        if os.path.isdir(args.record):
            raise ValueError(f"--record {args.record!r} is a directory, not a file path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"--record {args.record!r}: {folder} is not a writable directory")
    if args.replay_threads > 16:
        raise ValueError(f"--replay-threads {args.replay_threads} is above the limit of 16")
    return int(serve.main(args))


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return int(bench.main(args))


def build_parser() -> argparse.ArgumentParser:
    from . import snapshot

    parser = _Parser(prog="userfaultfd", description="User-space page-fault handling on Linux.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"userfaultfd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="the userfaultfd(2) example program, reproduced")
    p.add_argument("pages", type=_page_count, help="number of pages to map and read")
    p.add_argument(
        "--delay",
        type=_non_negative_float,
        default=0.1,
        metavar="SECONDS",
        help="pause between reads (default 0.1, as the seed)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="what userfaultfd offers on this machine")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("serve", help="a page-fault handler for Firecracker-style snapshot restore")
    p.add_argument("--socket", required=True, metavar="PATH", help="UNIX socket to listen on")
    p.add_argument(
        "--memory",
        required=True,
        metavar="FILE|ADDRESS",
        help="the guest memory file, or a stored snapshot (file:///DIR/NAME, s3://BUCKET/.../NAME)",
    )
    p.add_argument(
        "--prefetch",
        choices=["none", "all"],
        default="none",
        help="install every region in the background (faults still come first)",
    )
    p.add_argument(
        "--readahead",
        default="adaptive",
        metavar="N|adaptive|none",
        help="pages installed after each fault (default adaptive)",
    )
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="accept peers of this uid too (default: our own uid only)",
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="threads per client")
    p.add_argument(
        "--record",
        metavar="PATH",
        help="record the first client's first touches into this working-set file (written when "
        "it disconnects, on SIGUSR1, after --record-seconds, or when the server stops)",
    )
    p.add_argument(
        "--record-seconds",
        type=_non_negative_float,
        metavar="S",
        help="end the recording this many seconds after the client connected",
    )
    p.add_argument(
        "--replay",
        metavar="PATH",
        help="install this working set for every client in the background, faults first",
    )
    p.add_argument(
        "--replay-threads", type=_positive_int, default=1, metavar="N", help="(default 1)"
    )
    snapshot.add_serve_options(p)
    p.set_defaults(func=_cmd_serve)

    from .bench import SCENARIOS

    p = sub.add_parser(
        "bench",
        help="performance as ratios against C references",
        description="Each scenario measures ours and a C reference side by side in one run.",
        epilog="scenarios:\n"
        + "\n".join(
            textwrap.fill(text, 78, initial_indent=f"  {name:15}", subsequent_indent=" " * 17)
            for name, (text, _) in SCENARIOS.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--scenario",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"run only these (repeatable or comma-separated): {', '.join(SCENARIOS)}",
    )
    p.set_defaults(func=_cmd_bench)

    from . import ws

    ws.add_parser(sub)
    snapshot.add_parser(sub)
    # Named in the error a bare `userfaultfd` gets (argparse would say "required: command").
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error worth a message
        sys.stderr.close()
        return 141
    except (OSError, ValueError) as e:
        print(f"userfaultfd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
