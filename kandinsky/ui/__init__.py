"""``kandinsky ui``: a web page for every task (Gradio; ``pip install 'kandinsky21[ui]'``).

:mod:`kandinsky.ui.handlers` holds the work, without gradio (one pipeline, settings validated as the CLI's, PNG
files with the pipeline's metadata, Stop); :mod:`kandinsky.ui.app` builds the page on it and serves it. Only the
CLI imports this package (``kandinsky ui``, which imports gradio when it runs). See docs/ui.md.
"""
