"""Where a training step's time goes: ``kandinsky train ... --profile-steps N``.

Every step marks its parts with :func:`torch.profiler.record_function` ranges (no cost without a profiler):

* ``kandinsky/step``: the whole optimizer step (data, forward, backward, optimizer, the step's one read-back);
* ``kandinsky/data_wait``: the training process waiting for the data loader's next micro-batch. With enough
  workers the loader has it ready (prepared while the previous steps computed) and this is ~0; a step that waits
  here leaves the device idle: its *idle fraction* is ``data_wait / step``;
* ``kandinsky/inputs``: the inputs made from a micro-batch in the training process: the frozen encoders
  without ``--cache``, the copies to the device, the dropout.

:class:`Profiler` runs :class:`torch.profiler.profile` over N steps after one warm-up step (the first step of an
invocation starts the loader's workers and fills its queue) and writes ``OUT/profile/summary.json`` and the
trace (``trace.json``, for ``chrome://tracing`` or https://ui.perfetto.dev), and prints one line. On CUDA it adds
the fraction of the wall time in which the GPU ran kernels.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

PROFILE_FOLDER = "profile"
STEP, DATA_WAIT, INPUTS = "kandinsky/step", "kandinsky/data_wait", "kandinsky/inputs"


class StepTimer:
    """The host time one step spent waiting for the data loader (``waited``) and making the inputs from what it
    gave (``prepared``), in seconds; the ranges are also marked for the profiler."""

    def __init__(self):
        self.waited = 0.0
        self.prepared = 0.0

    def waiting(self) -> contextlib.AbstractContextManager:
        return self._timed(DATA_WAIT, "waited")

    def preparing(self) -> contextlib.AbstractContextManager:
        return self._timed(INPUTS, "prepared")

    @contextlib.contextmanager
    def _timed(self, label: str, total: str) -> Iterator[None]:
        """The block's wall time added to ``self.<total>``, marked ``label`` for the profiler."""
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(label):
                yield
        finally:
            setattr(self, total, getattr(self, total) + time.perf_counter() - start)


class Profiler:
    """``--profile-steps N``: :class:`torch.profiler.profile` over the ``steps`` steps that follow the first step
    of this invocation (its warm-up), on the main process; :meth:`finish` summarises and writes ``folder``."""

    def __init__(self, steps: int, device: torch.device, folder: Path, first_step: int,
                 warn: Callable[[str], None] = lambda message: None):
        self.steps, self.device, self.folder, self.warn = steps, device, Path(folder), warn
        self.first_step = first_step  # 0-based step this invocation starts at
        self.seen = 0  # steps run so far
        self.profiled = 0
        self.profile: torch.profiler.profile | None = None
        self.summary: dict | None = None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one training step."""
        if self.seen == 1 and self.profile is None and self.summary is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()
        with torch.profiler.record_function(STEP):
            yield
        self.seen += 1
        if self.profile is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's kernels inside the profiled window
            self.profiled += 1
            if self.profiled == self.steps:
                self._stop()

    def finish(self) -> dict | None:
        """Stop (if the run ended first), write and print the summary; returns it (None: nothing profiled)."""
        if self.profile is not None:
            self._stop()
        if self.summary is None:
            self.warn(f"--profile-steps: no step was profiled (the first step of a run is its warm-up; this one "
                      f"ran {self.seen})")
        return self.summary

    def abandon(self) -> None:
        """Stop profiling without a summary (the run failed)."""
        profile, self.profile = self.profile, None
        if profile is not None:
            profile.stop()

    def _stop(self) -> None:
        profile, self.profile = self.profile, None
        profile.stop()
        self.summary = summarize(spans(profile), self.profiled)
        first = self.first_step + 2  # 1-based, after the warm-up step
        self.summary.update(first_step=first, last_step=first + self.profiled - 1, device=str(self.device),
                            asked=self.steps)
        self.folder.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.folder / "trace.json"))
        (self.folder / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        print(f"kandinsky: profile: {describe_summary(self.summary)}; see {self.folder}", file=sys.stderr)


def spans(profile: torch.profiler.profile) -> list[tuple[str, float, float, bool]]:
    """``(name, start, end, on_device)`` of every event a stopped profile recorded, in seconds; ``on_device``
    for the accelerator's activity (kernels, copies), not the annotations of :func:`record_function`. Read from
    the profiler's raw results (building :meth:`~torch.profiler.profile.events` takes ~0.1 ms per event, seconds
    for a few steps of a UNet); from those events where the raw results are not there."""
    results = getattr(getattr(profile, "profiler", None), "kineto_results", None)
    out = []
    if results is not None:
        for event in results.events():
            device = event.device_type() != torch.autograd.DeviceType.CPU and not event.is_user_annotation()
            out.append((event.name(), event.start_ns() / 1e9, event.end_ns() / 1e9, device))
        return out
    for event in profile.events():
        device = event.device_type != torch.autograd.DeviceType.CPU and not event.name.startswith("kandinsky/")
        out.append((event.name, event.time_range.start / 1e6, event.time_range.end / 1e6, device))
    return out


def summarize(events: list[tuple[str, float, float, bool]], steps: int) -> dict:
    """The time of the profiled steps by part, from :func:`spans`: ``wall_s`` (the steps), ``data_wait_s`` and
    ``idle_fraction`` (waiting for the loader), ``inputs_s`` and ``inputs_fraction``; where the accelerator's
    activity was recorded also ``device_busy_fraction`` (the union of its intervals over the steps' span)."""
    totals = {STEP: 0.0, DATA_WAIT: 0.0, INPUTS: 0.0}
    window = [float("inf"), float("-inf")]
    device = []
    for name, start, end, on_device in events:
        if on_device:
            device.append((start, end))
        elif name in totals:
            totals[name] += end - start
            if name == STEP:
                window = [min(window[0], start), max(window[1], end)]
    wall = totals[STEP]
    summary = {"steps": steps, "wall_s": wall, "data_wait_s": totals[DATA_WAIT], "inputs_s": totals[INPUTS],
               "idle_fraction": totals[DATA_WAIT] / wall if wall > 0 else None,
               "inputs_fraction": totals[INPUTS] / wall if wall > 0 else None}
    if device and window[1] > window[0]:
        busy, reach = 0.0, window[0]
        for start, end in sorted(device):
            start, end = max(start, reach), min(end, window[1])
            if end > start:
                busy += end - start
                reach = end
        summary["device_busy_fraction"] = busy / (window[1] - window[0])
    return summary


def describe_summary(summary: dict) -> str:
    """One line: the steps, their time, the idle fraction."""
    steps = f"step {summary['first_step']}" if summary["steps"] == 1 else \
        f"steps {summary['first_step']}-{summary['last_step']}"
    text = (f"{steps} took {summary['wall_s']:.4g} s, of which waiting for data {summary['data_wait_s']:.3g} s "
            f"(idle fraction {100 * (summary['idle_fraction'] or 0):.2f}%) and making the inputs "
            f"{summary['inputs_s']:.3g} s ({100 * (summary['inputs_fraction'] or 0):.1f}%)")
    if "device_busy_fraction" in summary:
        text += f"; the GPU ran kernels {100 * summary['device_busy_fraction']:.1f}% of the time"
    if summary["steps"] < summary.get("asked", summary["steps"]):
        text += f" (the run ended after {summary['steps']} of the {summary['asked']} steps asked)"
    return text
