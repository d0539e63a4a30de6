"""``fedvitgan privacy-report RUN_FOLDER``: the privacy-budget report of a run.

Writes RUN_FOLDER/privacy/report.md, report.json and epsilon.png: per hospital the mechanism, noise,
clipping, sampling rate, DP steps, epsilon at delta by the configured accountant and by the other
one, the neighbouring relation, what is and is not covered, and whether the budget stop triggered.
A simulation with privacy.enabled=true writes it by itself at the end.
"""

from __future__ import annotations

import sys

from simulations.commands import run_folder_report


def main(argv: list[str]) -> int:
    from common.privacy.report import write_privacy_report

    return run_folder_report(argv, "fedvitgan privacy-report", __doc__, write_privacy_report,
                             (FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
