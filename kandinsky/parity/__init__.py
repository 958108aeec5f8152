"""Parity report: every component at its full official configuration against diffusers 0.42.1 (same
random weights, converted) and against the original implementation's fixtures.

Each ``kandinsky/parity/<component>.py`` defines ``checks() -> Iterator[Row]``; rows are yielded one at
a time so that full-size models are freed before the next check starts. Needs the ``test`` extra
(diffusers). Run: ``kandinsky parity`` or ``python scripts/parity_report.py [components...]``.

``--model 2.2`` (``run(components, model="2.2")``) reports Kandinsky 2.2's models instead: its prior and its
three UNets (text-to-image, inpainting, ControlNet), whose ``checks`` take ``model``. The MoVQ and the samplers are
the same in both versions (``movq`` and ``schedulers`` may be named with ``--model 2.2``, their rows are 2.1's);
2.2 has no M-CLIP (``text_encoder``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import sys
import time
from dataclasses import dataclass

import torch

COMPONENTS = ("movq", "prior", "unet", "text_encoder", "schedulers")
MODELS = ("2.1", "2.2")
# what --model 2.2 runs by default (its own models), and what it also accepts (the models it shares with 2.1)
COMPONENTS_22 = ("prior", "unet")
SHARED = ("movq", "schedulers")


@dataclass
class Row:
    """One comparison. ``metric`` says which error the tolerance bounds: ``"abs"`` or ``"rel"``
    (max abs error divided by the reference's max magnitude)."""

    component: str
    check: str
    max_abs: float
    max_rel: float
    tolerance: float
    metric: str = "rel"

    @property
    def passed(self) -> bool:
        error = self.max_rel if self.metric == "rel" else self.max_abs
        return error <= self.tolerance


def compare(component: str, check: str, ours: torch.Tensor, reference: torch.Tensor,
            tolerance: float, metric: str = "rel") -> Row:
    """A :class:`Row` from two tensors of the same shape."""
    if ours.shape != reference.shape:
        raise ValueError(f"{component}/{check}: shape {tuple(ours.shape)} != reference {tuple(reference.shape)}")
    diff = (ours.double() - reference.double()).abs().max().item()
    scale = max(reference.double().abs().max().item(), 1e-12)
    return Row(component, check, diff, diff / scale, tolerance, metric)


def _format(row: Row) -> str:
    bound = f"{row.metric} <= {row.tolerance:.0e}"
    return (f"| {row.component:<12} | {row.check:<44} | {row.max_abs:10.3e} | {row.max_rel:10.3e} "
            f"| {bound:<12} | {'pass' if row.passed else 'FAIL'} |")


def run(components: list[str], out=None, model: str = "2.1") -> list[Row]:
    """Run the checks of ``components`` (of Kandinsky ``model``) and print the table as rows arrive (to ``out``,
    default standard output)."""
    out = out if out is not None else sys.stdout
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    rows: list[Row] = []
    print("| component    | check                                        |    max abs |    max rel | tolerance    | pass |", file=out)
    print("|--------------|----------------------------------------------|------------|------------|--------------|------|", file=out)
    for component in components:
        module = importlib.import_module(f"kandinsky.parity.{component}")
        # the checks of the models that differ between the versions take the version
        options = {"model": model} if "model" in inspect.signature(module.checks).parameters else {}
        start = time.perf_counter()
        with torch.no_grad():
            for row in module.checks(**options):
                rows.append(row)
                print(_format(row), file=out, flush=True)
        gc.collect()
        print(f"<!-- {component}: {time.perf_counter() - start:.0f} s -->", file=out, flush=True)
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed", file=out)
    return rows


def available_components() -> list[str]:
    return [c for c in COMPONENTS if importlib.util.find_spec(f"kandinsky.parity.{c}") is not None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trace"]:  # kandinsky parity trace COMPONENT: the divergence tracer
        from kandinsky.parity.trace import main as trace_main

        return trace_main(argv[1:])
    parser = argparse.ArgumentParser(prog="kandinsky parity", description=__doc__.split("\n\n")[0],
                                     epilog="kandinsky parity trace COMPONENT: where ours and the reference first "
                                            "differ, module by module (kandinsky parity trace --help)")
    parser.add_argument("components", nargs="*", help=f"subset of {', '.join(COMPONENTS)} (default: all available; "
                        f"with --model 2.2: {', '.join(COMPONENTS_22)}, and {', '.join(SHARED)} when named)")
    parser.add_argument("--model", default="2.1", choices=MODELS,
                        help="the Kandinsky version whose models are compared (default: 2.1); 2.2: its prior and its "
                             "UNets (text-to-image, inpainting, ControlNet)")
    args = parser.parse_args(argv)
    available = available_components()
    if args.model == "2.2":
        components = args.components or [c for c in COMPONENTS_22 if c in available]
        unknown = [c for c in components if c not in available or c not in COMPONENTS_22 + SHARED]
        if unknown:
            parser.error(f"--model 2.2: expected components among {[*COMPONENTS_22, *SHARED]} (Kandinsky 2.2 has no "
                         f"M-CLIP), got {unknown}")
    else:
        components = args.components or available
        unknown = [c for c in components if c not in available]
        if unknown:
            parser.error(f"unknown component(s) {unknown}; available: {available}")
    try:
        import diffusers
    except ImportError:
        print("the parity report needs diffusers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    diffusers.utils.logging.set_verbosity_error()  # its schedulers warn on every bare step() call
    rows = run(components, model=args.model)
    return 0 if all(r.passed for r in rows) else 1
