"""``python -m kandinsky``: the ``kandinsky`` command, which
``torchrun --nproc_per_node=N -m kandinsky train ...`` runs in every process."""

import sys

from kandinsky.cli import main

sys.exit(main())
