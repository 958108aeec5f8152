"""Parity report of every component against diffusers 0.42.1 and the original fixtures: ``kandinsky parity``
(see kandinsky.parity)."""

import sys

from kandinsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]]))
