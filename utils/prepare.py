"""The command ``python -m utils.prepare``: runs :mod:`utils.data.prepare` (which lives with the rest of the
data layer; this module only keeps the command short)."""
from utils.data.prepare import main
from utils.errors import cli

if __name__ == "__main__":
    cli(main)
