"""kandinsky: a clean PyTorch reimplementation of Kandinsky 2.1 and 2.2 (prior, decoder UNet, MoVQ, samplers).

    from kandinsky import Kandinsky21, save_png
    pipe = Kandinsky21.from_pretrained("kandinsky-community/kandinsky-2-1")   # or Kandinsky21.from_config("tiny")
    save_png(pipe.text2img("red cat, 4k photo")[0], "cat.png")

``import kandinsky`` itself imports nothing: the names below load their module (and torch) on first use.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"Kandinsky21": "kandinsky.pipeline", "Kandinsky22": "kandinsky.pipeline",
         "NonFiniteError": "kandinsky.pipeline", "save_png": "kandinsky.png"}
__all__ = ["Kandinsky21", "Kandinsky22", "NonFiniteError", "save_png", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kandinsky' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
