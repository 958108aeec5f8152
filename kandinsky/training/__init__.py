"""Fine-tuning the prior and the decoders (``kandinsky train``).

    from kandinsky.training import decoder_loss, prior_loss          # the losses, per sample (losses.py)
    from kandinsky.training import TrainConfig, train                 # a whole run (config.py, loop.py)

The modules: ``config`` (the settings and their checks), ``loop`` (the run), ``losses``, ``data`` (records,
encoders, cache, keyed random draws), ``checkpoints`` (what a run writes and resumes from), ``cli`` (the
command line).
"""

from .config import ConfigError, TrainConfig
from .loop import train
from .losses import decoder_loss, prior_loss

__all__ = ["ConfigError", "TrainConfig", "decoder_loss", "prior_loss", "train"]
