"""Run logs: ``log.jsonl`` (one JSON object per step and per epoch, the source of truth), optional
mirrors of its numbers to TensorBoard (``tensorboard=True``) and Weights & Biases (``wandb=True``,
offline unless ``WANDB_MODE`` says otherwise), and ``curves.png`` (loss, Recall@1 and MAP@R per epoch)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from dmlfast.checks import InputError

#: flag -> (module that must be importable, pip package)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class TrackingUnavailableError(InputError, RuntimeError):
    """An experiment tracker was asked for and its package is not installed."""


def check_trackers(tensorboard: bool = False, wandb: bool = False) -> None:
    """Raise ``TrackingUnavailableError`` (one line naming the pip package) for a requested tracker that is not installed."""
    for name, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        if not isinstance(wanted, bool):
            raise ValueError(f"check_trackers: {name} must be a bool, got {wanted!r}")
        module, package = TRACKERS[name]
        if wanted and importlib.util.find_spec(module) is None:
            raise TrackingUnavailableError(f"--{name} needs the {package} package, which is not installed: pip install {package}")


class LogWriteError(OSError):
    """``log.jsonl`` could not be written (e.g. the disk is full); the message names the file and why."""


def truncate_log(path, last_step: int) -> int:
    """Keep the records of the JSON-lines log ``path`` up to step ``last_step`` (a resumed run's
    checkpoint) and drop the rest, a half-written last line included; returns how many were dropped.
    The file is replaced atomically."""
    if isinstance(last_step, bool) or not isinstance(last_step, int) or last_step < 0:
        raise ValueError(f"truncate_log: last_step must be an int >= 0, got {last_step!r}")
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.truncating")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class RunLogger:
    """Appends records to ``<folder>/log.jsonl`` and mirrors their numbers to the requested trackers.

    ``log(kind, step, **values)`` writes ``{"kind": kind, "step": step, **values}`` (NaN becomes
    ``null``); each int/float value also goes to TensorBoard (``<folder>/tensorboard``, tag
    ``kind/name``) and to Weights & Biases (a run in ``<folder>/wandb``, project ``dmlfast``, named after
    the folder, ``config`` as its configuration, key ``kind/name`` at ``step``). ``resume_step``: a run
    resumed from the checkpoint at that step; what the killed run logged after it is dropped from
    ``log.jsonl`` (:func:`truncate_log`) and hidden in TensorBoard (``purge_step``), so that no step is
    logged twice. A failed write raises :class:`LogWriteError`."""

    def __init__(self, folder, tensorboard: bool = False, wandb: bool = False, config: Optional[Dict[str, Any]] = None,
                 resume_step: Optional[int] = None):
        check_trackers(tensorboard, wandb)
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"RunLogger: config must be a dict or None, got {type(config).__name__}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "log.jsonl"
        if resume_step is not None:
            truncate_log(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            resumed = {} if resume_step is None else {"purge_step": resume_step + 1}  # hide the killed run's later steps
            self._tb = SummaryWriter(str(self.folder / "tensorboard"), **resumed)
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(project="dmlfast", name=self.folder.resolve().name, dir=str(self.folder),
                                            config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": int(step)}
        record.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()})
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:
            raise LogWriteError(f"cannot write {self.path}: {error.strerror or error}") from error
        numbers = {f"{kind}/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for tag, value in numbers.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullLogger:
    """:class:`RunLogger`'s interface, recording nothing: the logger of ranks other than 0 in a torchrun training."""

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


#: ``(history key, legend)`` of the evaluation curves, drawn when a run recorded them (binary: ``--binary-eval``).
CURVE_METRICS = (("recall@1", "Recall@1"), ("map@r", "MAP@R"), ("binary_recall@1", "Recall@1, binary"),
                 ("binary_map@r", "MAP@R, binary"))


def plot_curves(history: List[Dict[str, Any]], path) -> Path:
    """PNG of the mean training loss and, per evaluated epoch, Recall@1 and MAP@R (and their binarised
    versions when recorded) from ``history`` (one dict per evaluation/epoch, with ``epoch`` and
    optionally ``loss``, ``recall@1``, ``map@r``, ``binary_recall@1``, ``binary_map@r``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(history, list):
        raise ValueError(f"plot_curves: history must be a list of dicts, got {type(history).__name__}")
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
    if loss:
        ax_loss.plot(*zip(*loss), marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="loss")
    for key, label in CURVE_METRICS:
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax_r1.plot(*zip(*points), marker="o", label=label)
    if ax_r1.lines:
        ax_r1.legend(fontsize=8)
    ax_r1.set(xlabel="epoch (0 = before training)", ylabel="metric (fraction, 0-1)", title="held-out classes", ylim=(0, 1))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
