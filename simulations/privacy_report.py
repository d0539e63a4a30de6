"""``fedvitgan privacy-report RUN_FOLDER``: the privacy-budget report of a run.

Writes RUN_FOLDER/privacy/report.md, report.json and epsilon.png: per hospital the mechanism, noise,
clipping, sampling rate, DP steps, epsilon at delta by the configured accountant and by the other
one, the neighbouring relation, what is and is not covered, and whether the budget stop triggered.
A simulation with privacy.enabled=true writes it by itself at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedvitgan privacy-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path, help="a run folder (holding summary.json)")
    args = parser.parse_args(argv)
    from common.privacy.report import write_privacy_report

    try:
        paths = write_privacy_report(args.run_folder)
    except (FileNotFoundError, ValueError) as error:
        print(f"fedvitgan privacy-report: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
