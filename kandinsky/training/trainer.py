# TEMPORARY test shim: kandinsky/cli.py still names this module
from kandinsky.training.cli import main  # noqa: F401
