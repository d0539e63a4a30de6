"""The ``fedvitgan`` command: one entry point, one subcommand per job.

    fedvitgan simulate [hydra overrides]     federated training of N hospitals on this machine
    fedvitgan experiment [hydra overrides]   variants x settings x seeds, with baselines (results.md)
    fedvitgan data check ROOT --dataset N    validate a hospital's copy of a data set
    fedvitgan data fetch mnist5k --out DIR   5,000 real MNIST digits as an ImageFolder (uses the network)
    fedvitgan data fetch sklearn-digits --out DIR   1,797 real 8x8 digits from the installed scikit-learn
    fedvitgan report RUN                     report.md and curves.png of a run folder
    fedvitgan predict RUN PATH... --out CSV  classify image files or folders with the global classifier
    fedvitgan export RUN --out DIR           the classifier as a torch.export program (.pt2) + model.json
    fedvitgan generate RUN --per-class N --out DIR   an ImageFolder of generated patches
    fedvitgan privacy-report RUN             the privacy-budget report of a run with DP on
    fedvitgan prior --out FILE               a trunk prior from random-process images (no patient data)
    fedvitgan certs [options]                TLS certificates and hospital keys for a deployment
    fedvitgan supernode [flower flags]       a hospital's SuperNode that polls more often than Flower's
    fedvitgan superexec [flower flags]       a hospital's SuperExec (warm ClientApps, pinned app code)
    fedvitgan fab hash [DIR|FAB]             the FAB hash a hospital pins as app-sha256

Run ``fedvitgan <command> --help`` for a command's options.
"""

from __future__ import annotations

import importlib
import sys

USAGE = __doc__ or ""

#: subcommand -> (module, function taking argv and returning an exit code); USAGE lists every one
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.simulate", "main"),
    "experiment": ("simulations.experiments.runner", "main"),
    "data": ("simulations.data_check", "data_command"),
    "certs": ("simulations.certs", "main"),
    "supernode": ("client.supernode", "main"),
    "superexec": ("client.warm_superexec", "main"),
    "fab": ("client.app_pin", "fab_command"),
    "privacy-report": ("simulations.privacy_report", "main"),
    "prior": ("simulations.prior", "main"),
    "report": ("simulations.report", "main"),
    "predict": ("simulations.predict", "main"),
    "export": ("simulations.export", "main"),
    "generate": ("simulations.generate", "main"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"fedvitgan: unknown command {command!r}\n\n{USAGE.strip()}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    return int(getattr(importlib.import_module(module), function)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
