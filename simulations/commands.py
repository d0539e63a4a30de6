"""What every ``fedvitgan`` subcommand's ``main(argv) -> exit status`` shares."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def run_hydra_main(entry: Callable[[], None], prog: str, argv: list[str]) -> int:
    """Run a ``@hydra.main`` entry point with ``argv`` as its command line; its exit status (a
    message passed to ``SystemExit`` is printed on stderr and gives 1)."""
    sys.argv = [prog, *argv]
    try:
        entry()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return int(stop.code or 0)
    return 0


def run_folder_report(argv: list[str], prog: str, description: str | None,
                      write: Callable[[Path], dict[str, Path]], errors: tuple[type[Exception], ...],
                      epilog: str | None = None) -> int:
    """A command that writes a report into a run folder: prints the files, or the error and exit status 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path, help="a run folder (holding summary.json)")
    args = parser.parse_args(argv)
    try:
        paths = write(args.run_folder)
    except errors as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0
