"""kandinsky: a clean PyTorch reimplementation of Kandinsky 2.1 (prior, decoder UNet, MoVQ, samplers)."""

__version__ = "0.1.0"
