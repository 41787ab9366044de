"""The command ``python -m utils.mock``: runs :mod:`utils.data.mock` (which lives with the rest of the
data layer; this module only keeps the command short)."""
from utils.data.mock import main
from utils.errors import cli

if __name__ == "__main__":
    cli(main)
