"""``python -m fedvitgan``: the ``fedvitgan`` command."""

import sys

from fedvitgan import main

sys.exit(main())
