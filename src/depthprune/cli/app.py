"""The command line's entry point: builds the parser from the command modules, runs the command, and turns
every failure into one line and an exit status (2: bad input, 1: a bug, 130/143: interrupted/terminated).

Each command is one module of this package (``analyze.py``, ``prune.py``, ...) declaring ``add_parser(commands)``
and ``run(args)``; :data:`COMMANDS` lists them once, in the order of ``depthprune --help``. Their flags come
from the stage options (``depthprune.config``) and the registries (criteria, tasks, healing methods, each
with its plug-ins' options), read when the parser is built, so plug-ins registered before count. The
command modules are imported only when the parser is built, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys

from ..errors import DepthpruneError

COMMANDS = ("analyze", "prune", "export", "heal", "eval", "sweep", "results", "report")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, no usage block, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"depthprune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="depthprune",
        description="Remove whole transformer layers by angular distance (Gromov et al. 2024).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f".{name}", __package__)
        command.add_parser(commands).set_defaults(run=command.run)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so every ``finally`` and temporary-file clean-up runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


DISK_FULL = "no space left on the disk: free some space and rerun (nothing half-written was kept)"


def _is_disk_full(exc: BaseException) -> bool:
    # Writers in Rust or C (safetensors, sqlite) report ENOSPC in their own exception types: look at the
    # whole chain and at the text, not only at OSError.errno.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _os_error_message(exc: OSError) -> str:
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a path you can write, or fix its permissions"
    return f"{exc.strerror or exc}{where}: check the path and rerun"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        args.run(args)
    except DepthpruneError as exc:
        print(f"depthprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("depthprune: terminated", file=sys.stderr)
        return 143
    except Exception as exc:
        if args.debug:
            raise
        if _is_disk_full(exc):
            print(f"depthprune: error: {DISK_FULL}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            print(f"depthprune: error: {_os_error_message(exc)}", file=sys.stderr)
            return 2
        # The safety net: a failure without its own message is a bug to report, hence exit status 1.
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"depthprune: error: internal error ({type(exc).__name__}: {first}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

