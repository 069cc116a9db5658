"""`python -m fbnas <command> ...`: the same as the `fbnas` console script."""
import sys

from .cli import main

sys.exit(main())
