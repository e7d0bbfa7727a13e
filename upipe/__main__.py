"""``python -m upipe ...`` works like the ``upipe`` command (see :mod:`upipe.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
