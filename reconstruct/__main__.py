"""`python -m reconstruct ...` is the same as the `reconstruct` command."""
import sys

from .cli import main

sys.exit(main())
