"""The installed ``fedvitgan`` distribution: one top-level name in site-packages.

The code lives in the design card's folders (``common``, ``client``, ``server``, ``simulations``,
``conf``) and imports them by those names, because that is how a Flower app (FAB) runs: the
SuperExec puts the FAB's own folder first on ``sys.path`` and imports ``client.app:app`` from it, so
the code a hospital pinned is the code that runs. A wheel installs those folders inside this package
(``fedvitgan/_app/``), not beside it, so they cannot collide with another distribution's
``common`` or ``server``; the ``fedvitgan`` command puts that one folder on the path of its own
process and of the processes it starts (:func:`use_app_root`). From a source checkout (the editable
install, the tests) the folders are the checkout's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The folders the code imports by their own names (the FAB's layout).
APP_PACKAGES: tuple[str, ...] = ("common", "client", "server", "simulations", "conf")


def app_root() -> Path:
    """The folder that holds ``common/``, ``client/``, ...: ``fedvitgan/_app`` in a wheel, else the checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "_app"
    return installed if installed.is_dir() else here.parent


def use_app_root() -> Path:
    """Put :func:`app_root` first on ``sys.path`` and on ``PYTHONPATH`` (children inherit it); return it."""
    root = str(app_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return Path(root)


def main() -> int:
    """The ``fedvitgan`` command (see ``simulations/cli.py``)."""
    use_app_root()
    from simulations.cli import main as cli_main

    return cli_main()
