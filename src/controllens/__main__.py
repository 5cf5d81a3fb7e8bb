"""``python -m controllens``: the command line."""

import sys

from controllens.cli import main

if __name__ == "__main__":
    sys.exit(main())
