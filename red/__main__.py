import sys

from red.cli import run

sys.exit(run())
