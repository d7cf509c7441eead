"""`python -m giseg <command> ...`: the same as the `giseg` console script."""
import sys

from giseg.cli import main

sys.exit(main())
