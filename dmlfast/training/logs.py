"""Run logs: ``log.jsonl`` (one JSON object per step and per epoch), TensorBoard events when the
``tensorboard`` package is installed, and ``curves.png`` (loss, Recall@1 and MAP@R per epoch)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List


class RunLogger:
    """Appends records to ``<folder>/log.jsonl`` and mirrors numbers to TensorBoard if available.

    ``log(kind, **values)`` writes ``{"kind": kind, **values}``; NaN becomes ``null``."""

    def __init__(self, folder, tensorboard: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "log.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": int(step)}
        record.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
    ax_r1.set(xlabel="epoch (0 = before training)", ylabel="metric", title="held-out classes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
