"""The settings of one training run (:class:`TrainConfig`, one field per option of ``kandinsky train``), their
defaults and their validation (:class:`ConfigError`, found before any work is done)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kandinsky import distributed
from kandinsky.settings import MODELS
from kandinsky.training.losses import OBJECTIVES

# task -> the component it trains
TASKS = {"prior": "prior", "decoder": "unet", "inpaint": "unet_inpaint"}
OPTIMIZERS = ("adamw", "adafactor")
FREEZE = ("resblocks", "attention")
PRECISIONS = ("no", "bf16", "fp16")
DEFAULT_LR = 1e-5  # full fine-tuning; the original used Adafactor at 5e-6
DEFAULT_LORA_LR = 1e-4
# the original datasets' conditioning dropout
DEFAULT_TEXT_DROPOUT = {"prior": 0.1, "decoder": 0.5, "inpaint": 0.5}
DEFAULT_IMAGE_DROPOUT = 0.1
# the decoder objective of each model: 2.1's original trainer (mse + variational bound), diffusers' 2.2 example (mse)
DEFAULT_OBJECTIVE = {"2.1": "original", "2.2": "eps"}
DEFAULT_PREFETCH_FACTOR = 2  # micro-batches each data-loader worker prepares ahead (torch's default)
TINY = re.compile(r"^tiny(?::(\d+))?$")  # = kandinsky.hub.TINY: the tiny random weights
# settings a resumed run must share with the run it continues (the others may change, e.g. --steps), compared
# resolved (TrainConfig.resume_settings: a default given explicitly is the default); the base weights (--weights,
# --revision) are compared as well, resolved too (TrainConfig.base)
RESUME_FIXED = ("task", "model", "batch_size", "seed", "optimizer", "weight_decay", "lr", "lr_warmup", "objective",
                "snr_gamma", "lora_rank", "lora_alpha", "freeze", "ema", "resolution", "text_dropout",
                "image_dropout")
# the float options: each must be a finite number (inf and nan are refused before any work)
FLOAT_OPTIONS = ("lr", "weight_decay", "max_grad_norm", "snr_gamma", "lora_alpha", "ema", "text_dropout",
                 "image_dropout")


class ConfigError(ValueError):
    """A setting that cannot work, found before any work is done (exit code 2)."""


def default_num_workers() -> int:
    """Data-loader workers per process when ``--num-workers`` is not given: the cores this process may use (its
    share of them when ``torchrun`` starts several processes on the machine) less one for the training process
    itself, at most 4, at least 0 (the main process reads the data)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, cores // local - 1))


@dataclass
class TrainConfig:
    """Settings of one training run; the command-line options of ``kandinsky train`` (see ``--help``)."""

    task: str
    weights: str
    data: str
    output: str
    steps: int = 1000
    batch_size: int = 1  # global: all processes, all accumulation micro-batches together
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR, or DEFAULT_LORA_LR with lora_rank
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_warmup: int = 0
    max_grad_norm: float | None = None
    seed: int = 0
    model: str | None = None  # "2.1" or "2.2"; None: detected by train() (kandinsky.hub.model_evidence; else 2.1)
    objective: str | None = None  # None: DEFAULT_OBJECTIVE[model]
    snr_gamma: float | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    freeze: tuple[str, ...] = ()
    ema: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    strategy: str = "ddp"
    save_every: int = 1000
    keep_checkpoints: int = 1
    resume: bool = False
    stop_after: int | None = None
    resolution: int = 512
    cache: str | None = None
    text_dropout: float | None = None  # None: DEFAULT_TEXT_DROPOUT[task]
    image_dropout: float = DEFAULT_IMAGE_DROPOUT
    revision: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    progress: bool = True
    num_workers: int | None = None  # data-loader workers per process; None: default_num_workers()
    prefetch_factor: int | None = None  # None: DEFAULT_PREFETCH_FACTOR with workers
    profile_steps: int = 0  # profile this many steps (after one warm-up step) with torch.profiler
    allow_outside_paths: bool = False  # data paths may leave the data folder (absolute paths, ../, links)
    skip_nonfinite_steps: bool = False  # skip the optimizer step of a non-finite loss instead of stopping

    @property
    def component(self) -> str:
        return TASKS[self.task]

    @property
    def resolved_model(self) -> str:
        """``model``; a config recorded before Kandinsky 2.2 could be trained has none: 2.1."""
        return self.model if self.model is not None else "2.1"

    @property
    def decoder(self) -> bool:
        """Whether a decoder UNet is trained (``decoder``, ``inpaint``), not the prior."""
        return self.task != "prior"

    @property
    def feature_task(self) -> str:
        """What the frozen encoders compute for this task (:data:`kandinsky.training.data.FEATURES`): the prior's
        features, 2.1's decoder features (image and M-CLIP text) or 2.2's (image only)."""
        if not self.decoder:
            return "prior"
        return "decoder_22" if self.resolved_model == "2.2" else "decoder"

    @property
    def resolved_objective(self) -> str:
        return DEFAULT_OBJECTIVE[self.resolved_model] if self.objective is None else self.objective

    @property
    def resolved_num_workers(self) -> int:
        return default_num_workers() if self.num_workers is None else self.num_workers

    @property
    def tiny_22(self) -> bool:
        """Training from the tiny random 2.2 weights (``--weights tiny[:SEED] --model 2.2``), which no
        ``base.json`` can name: the run writes them into its output folder (``TINY_BASE``) as the base."""
        return self.resolved_model == "2.2" and TINY.match(str(self.weights)) is not None

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LORA_LR if self.lora_rank else DEFAULT_LR

    @property
    def resolved_text_dropout(self) -> float:
        if self.feature_task == "decoder_22":
            return 0.0  # the 2.2 decoder reads no text
        return DEFAULT_TEXT_DROPOUT[self.task] if self.text_dropout is None else self.text_dropout

    @property
    def resolved_lora_alpha(self) -> float | None:
        """LoRA's alpha (the rank by default: scale 1), None without LoRA."""
        if self.lora_rank is None:
            return None
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def source(self) -> str:
        """``weights``, a local folder made absolute (``base.json`` must still point at it from the output)."""
        local = Path(self.weights).expanduser()
        return str(local.resolve()) if local.exists() else self.weights

    @property
    def base_options(self) -> dict:
        """The options of the base weights besides their source (``base.json``, the cache description)."""
        return {"revision": self.revision} if self.revision is not None else {}

    @property
    def base(self) -> dict:
        """Where the base weights come from, resolved: ``{"source": ..., **base_options}`` (as ``base.json``)."""
        return {"source": self.source, **self.base_options}

    def as_json(self) -> dict:
        """The settings as JSON values (tuples as lists), as ``train_config.json`` and checkpoints record them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        """The settings that :meth:`as_json` recorded (fields unknown to this version are ignored, missing ones
        take their defaults). Raises ValueError for values that are not such a record."""
        if not isinstance(values, dict):
            raise ValueError(f"expected the settings of a run (a JSON object), got {type(values).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        missing = sorted({"task", "weights", "data", "output"} - set(known))
        if missing:
            raise ValueError(f"the settings of a run lack {missing}")
        return cls(**known)

    def resume_settings(self) -> dict:
        """The settings of :data:`RESUME_FIXED`, resolved: ``--lr 1e-5`` given explicitly is the default
        learning rate, ``--lora-alpha`` equal to the rank is the default alpha."""
        values = self.as_json()
        values.update(lr=self.resolved_lr, text_dropout=self.resolved_text_dropout,
                      lora_alpha=self.resolved_lora_alpha, model=self.resolved_model,
                      objective=self.resolved_objective if self.decoder else None)
        return {k: values[k] for k in RESUME_FIXED}

    def check(self, world_size: int = 1) -> None:
        """Raise :class:`ConfigError` naming the option for any setting that cannot work."""
        self._check_ranges()
        self._check_combinations(world_size)

    def _check_ranges(self) -> None:
        def positive(name: str, value, allow_zero: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise ConfigError(f"--{name}: expected an integer >= {0 if allow_zero else 1}, got {value!r}")

        def choice(name: str, value, choices) -> None:
            if value not in choices:
                raise ConfigError(f"--{name}: expected one of {list(choices)}, got {value!r}")

        def probability(name: str, value) -> None:
            if not 0 <= value <= 1:
                raise ConfigError(f"--{name}: expected a probability in [0, 1], got {value}")

        for name in FLOAT_OPTIONS:  # first: inf passes "> 0" and nan passes "< 0" checks below
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')}: expected a finite number, got {value!r}")

        choice("task", self.task, TASKS)
        if self.model is not None:
            choice("model", self.model, MODELS)
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "resolution"):
            positive(name.replace("_", "-"), getattr(self, name))
        for name in ("lr_warmup", "save_every", "seed", "profile_steps"):
            positive(name.replace("_", "-"), getattr(self, name), allow_zero=True)
        if self.num_workers is not None:
            positive("num-workers", self.num_workers, allow_zero=True)
        if self.prefetch_factor is not None:
            positive("prefetch-factor", self.prefetch_factor)
            if self.resolved_num_workers == 0:
                raise ConfigError(f"--prefetch-factor: only with data-loader workers (--num-workers >= 1), got "
                                  f"--num-workers {self.resolved_num_workers}")
        if self.stop_after is not None:
            positive("stop-after", self.stop_after)
        if self.lora_rank is not None:
            positive("lora-rank", self.lora_rank)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.objective is not None:
            choice("objective", self.objective, OBJECTIVES)
        choice("mixed-precision", self.mixed_precision, PRECISIONS)
        choice("strategy", self.strategy, distributed.STRATEGIES)
        for part in self.freeze:
            choice("freeze", part, FREEZE)
        if not self.resolved_lr > 0:
            raise ConfigError(f"--lr: expected a positive number, got {self.resolved_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay: expected a number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"--max-grad-norm: expected a positive number, got {self.max_grad_norm}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema: expected a decay in (0, 1), e.g. 0.9999, got {self.ema}")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("--lora-alpha: only with --lora-rank")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha: expected a positive number, got {self.lora_alpha}")
        probability("text-dropout", self.resolved_text_dropout)
        probability("image-dropout", self.image_dropout)

    def _check_combinations(self, world_size: int) -> None:
        if self.task == "prior":
            if self.freeze:
                raise ConfigError("--freeze: the original's resblocks/attention freezing applies to the decoder UNets, "
                                  "not the prior")
            if self.objective not in (None, "original") or self.snr_gamma is not None:
                raise ConfigError("--objective/--snr-gamma: the prior has one objective (x0 MSE); these are for "
                                  "decoder and inpaint")
        if self.feature_task == "decoder_22":
            if self.objective == "original":
                raise ConfigError("--objective original: Kandinsky 2.2 has no original trainer's objective; its "
                                  "decoder trains with --objective eps (diffusers' 2.2 decoder example)")
            if self.text_dropout is not None:
                raise ConfigError(f"--text-dropout: the Kandinsky 2.2 decoder reads no text (got {self.text_dropout}); "
                                  "use --image-dropout")
        if self.snr_gamma is not None and self.resolved_objective != "eps":
            raise ConfigError("--snr-gamma: Min-SNR weighting needs --objective eps")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"--snr-gamma: expected a positive number (5 is usual), got {self.snr_gamma}")
        if self.freeze and self.lora_rank is not None:
            raise ConfigError("--freeze: LoRA already freezes every base weight; use either --freeze or --lora-rank")
        if self.task != "prior" and self.resolution % 64:
            raise ConfigError(f"--resolution: expected a multiple of 64 (the MoVQ and the UNet halve it 6 times), "
                              f"got {self.resolution}")
        if self.optimizer == "adafactor" and self.strategy == "fsdp" and world_size > 1:
            raise ConfigError("--optimizer adafactor: transformers' Adafactor cannot update FSDP's sharded parameters; "
                              "use --strategy ddp or --optimizer adamw")
        if self.mixed_precision == "fp16" and self.strategy == "fsdp" and world_size > 1:
            raise ConfigError("--mixed-precision fp16: the gradient scaler would check each process's shard for "
                              "overflow separately under FSDP; use bf16 with --strategy fsdp (or ddp with fp16)")
        shares = world_size * self.grad_accum
        if self.batch_size % shares:
            raise ConfigError(f"--batch-size: the global batch ({self.batch_size}) must split evenly into "
                              f"{world_size} process(es) x {self.grad_accum} accumulation step(s)")
