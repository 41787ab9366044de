"""The command ``python -m utils.sdss``: runs :mod:`utils.data.sdss` (which lives with the rest of the
data layer; this module only keeps the command short)."""
from utils.data.sdss import main
from utils.errors import cli

if __name__ == "__main__":
    cli(main)
