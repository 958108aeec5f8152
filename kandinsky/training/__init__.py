"""Fine-tuning the prior and the decoders.

    from kandinsky.training import decoder_loss, prior_loss
"""

from .losses import decoder_loss, prior_loss

__all__ = ["decoder_loss", "prior_loss"]

from .trainer import TrainConfig, train  # noqa: E402  (kandinsky train: the fine-tuning loop)

__all__ += ["TrainConfig", "train"]
