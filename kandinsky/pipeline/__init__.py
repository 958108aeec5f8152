"""The task pipelines: :class:`Kandinsky21` (:mod:`kandinsky.pipeline.k21`) and :class:`Kandinsky22`
(:mod:`kandinsky.pipeline.k22`) on the shared pieces of :mod:`kandinsky.pipeline.common` (guidance, mask dilation,
task calls, the decoder's sampling loop)."""

from kandinsky.pipeline.common import NonFiniteError, dilate_repaint, guide, guided_denoiser
from kandinsky.pipeline.k21 import Kandinsky21
from kandinsky.pipeline.k22 import Kandinsky22
from kandinsky.settings import rounded_size

__all__ = ["Kandinsky21", "Kandinsky22", "NonFiniteError", "dilate_repaint", "guide", "guided_denoiser",
           "rounded_size"]
