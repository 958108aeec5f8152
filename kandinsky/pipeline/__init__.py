"""The task pipelines: :class:`Kandinsky21` (:mod:`kandinsky.pipeline.k21`) on the shared pieces of
:mod:`kandinsky.pipeline.common` (guidance, mask dilation, task calls)."""

from kandinsky.pipeline.common import NonFiniteError, dilate_repaint, guide, guided_denoiser
from kandinsky.pipeline.k21 import Kandinsky21
from kandinsky.settings import rounded_size

__all__ = ["Kandinsky21", "NonFiniteError", "dilate_repaint", "guide", "guided_denoiser", "rounded_size"]
