"""The learning-rate schedule of a training run, stepped once at the end of every epoch
(``config["lr_schedule"]``):

* ``"step"``: StepLR, x ``lr_gamma`` every ``lr_step`` epochs (``lr_step=0``: constant), warm-up
  epochs included;
* ``"multistep"``: x ``lr_gamma`` from each epoch of ``lr_milestones`` on (1-based epochs: epoch E
  trains at ``lr * lr_gamma ** #{m <= E}``);
* ``"plateau"``: ProxyNCA++'s schedule (Teh et al., ECCV 2020, euwern/proxynca_pp train.py and
  config/*.json; docs/losses.md §2.3). After each epoch past the warm-up, the Recall@1 of a
  validation set (the second half of the training classes, :func:`validation_split`; the run trains
  on the first half) steps ``ReduceLROnPlateau(mode="max", factor=lr_gamma, patience=lr_patience)``
  (torch's defaults otherwise, as published). The epochs from which the rate was lowered are kept
  (``lr_drops``), with the best validation epoch: the published second run trains on all training
  classes with ``MultiStepLR`` at those epochs and stops at that epoch, which is
  ``--lr-schedule multistep --lr-milestones <lr_drops> --epochs <best epoch>`` here
  (:meth:`EpochSchedule.rerun_flags`). The official trainval run calls ``MultiStepLR.step(e)``,
  which applies a recorded epoch one epoch later than the first run lowered the rate; dmlfast's
  second run replays the first run's rates as they were.

Warm-up epochs (``warmup_epochs``) stay outside the plateau schedule, as ProxyNCA++'s warm-up
precedes its schedule.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dmlfast.checks import InputError
from dmlfast.recipes import LR_SCHEDULES


class EpochSchedule:
    """The learning-rate schedule of ``config`` over ``optimizer``'s groups (see the module docstring).

    ``step(epoch, validation_recall)`` after each epoch (``validation_recall``: the validation
    Recall@1 when :meth:`needs_validation` said so, else ``None``); ``state_dict`` /
    ``load_state_dict`` for checkpoints (a plain StepLR state of an older checkpoint loads too)."""

    def __init__(self, optimizer, config: Dict[str, Any]):
        self.kind = config.get("lr_schedule", "step")
        self.warmup_epochs = int(config["warmup_epochs"])
        self.gamma = float(config["lr_gamma"])
        self.drops: List[int] = []
        self.best: Optional[Tuple[int, float]] = None  # (epoch, validation Recall@1)
        lr = torch.optim.lr_scheduler
        if self.kind == "step":
            step = int(config["lr_step"])
            self.inner = lr.StepLR(optimizer, step_size=step if step > 0 else 10**9, gamma=self.gamma)
        elif self.kind == "multistep":
            self.inner = lr.MultiStepLR(optimizer, milestones=[int(m) - 1 for m in config["lr_milestones"]], gamma=self.gamma)
        elif self.kind == "plateau":
            self.inner = lr.ReduceLROnPlateau(optimizer, mode="max", factor=self.gamma, patience=int(config["lr_patience"]))
        else:
            raise ValueError(f"EpochSchedule: lr_schedule must be one of {LR_SCHEDULES}, got {self.kind!r}")
        self.optimizer = optimizer

    def needs_validation(self, epoch: int) -> bool:
        """Whether :meth:`step` after ``epoch`` needs the validation Recall@1."""
        return self.kind == "plateau" and epoch > self.warmup_epochs

    def step(self, epoch: int, validation_recall: Optional[float] = None) -> None:
        """Advance the schedule after ``epoch`` (1-based)."""
        if self.kind != "plateau":
            self.inner.step()
            return
        if not self.needs_validation(epoch):
            return
        if validation_recall is None or not np.isfinite(validation_recall):
            raise ValueError(f"EpochSchedule.step: the plateau schedule needs the validation Recall@1 after epoch {epoch}, "
                             f"got {validation_recall!r}")
        before = [group["lr"] for group in self.optimizer.param_groups]
        self.inner.step(validation_recall)
        if any(group["lr"] < lr for group, lr in zip(self.optimizer.param_groups, before)):
            self.drops.append(epoch + 1)
        if self.best is None or validation_recall > self.best[1]:
            self.best = (epoch, float(validation_recall))

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "inner": self.inner.state_dict(), "drops": list(self.drops), "best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "inner" not in state:  # written before schedules other than StepLR existed
            self.inner.load_state_dict(state)
            return
        if state["kind"] != self.kind:
            raise ValueError(f"EpochSchedule.load_state_dict: the state is of a {state['kind']!r} schedule, this one is {self.kind!r}")
        self.inner.load_state_dict(state["inner"])
        self.drops = list(state["drops"])
        self.best = None if state["best"] is None else tuple(state["best"])

    def summary(self) -> Dict[str, Any]:
        """``{"lr_drops", "best_validation"}`` for the plateau schedule, else empty."""
        if self.kind != "plateau":
            return {}
        best = None if self.best is None else {"epoch": self.best[0], "recall@1": self.best[1]}
        return {"lr_drops": list(self.drops), "best_validation": best}

    def rerun_flags(self) -> Optional[str]:
        """The flags of the published second run (all training classes, the drops up to the best
        validation epoch, stopping there), or ``None`` for other schedules."""
        if self.kind != "plateau" or self.best is None:
            return None
        milestones = [epoch for epoch in self.drops if epoch <= self.best[0]]
        if not milestones:
            return f"--lr-schedule step --lr-step 0 --epochs {self.best[0]}"
        return f"--lr-schedule multistep --lr-milestones {','.join(map(str, milestones))} --epochs {self.best[0]}"


def validation_split(train) -> Tuple[Any, Any]:
    """``(first half of the classes, second half)`` of the training split ``train`` (an
    :class:`~dmlfast.data.ImageList` with labels in sorted class order), each with labels from 0:
    ProxyNCA++'s train/validation halves (CUB 0-49 / 50-99, Cars196 0-48 / 49-97, SOP 0-5658 / 5659-11317)."""
    from dmlfast.data import ImageList

    classes = train.num_classes
    half = classes // 2
    if half < 2:
        raise InputError(f"--lr-schedule plateau validates on half of the training classes, but the training split has "
                         f"{classes} classes; use --lr-schedule step or multistep")
    keep = train.labels < half
    ids = list(train.class_ids)
    first = ImageList([p for p, k in zip(train.paths, keep) if k], train.labels[keep], ids[:half], train.dataset, "train")
    second = ImageList([p for p, k in zip(train.paths, keep) if not k], train.labels[~keep] - half, ids[half:],
                       train.dataset, "validation")
    return first, second


def parse_milestones(text: str) -> Tuple[int, ...]:
    """``"17,30"`` -> ``(17, 30)``: strictly increasing epochs >= 1 (``ValueError`` otherwise)."""
    try:
        milestones = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected epochs such as 17,30, got {text!r}") from None
    if not milestones or milestones[0] < 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"expected strictly increasing epochs >= 1 such as 17,30, got {text!r}")
    return milestones


def check_schedule(c: Dict[str, Any]) -> None:
    """``InputError`` for a schedule configuration a run cannot use."""
    kind = c.get("lr_schedule", "step")
    if kind not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    milestones = tuple(c.get("lr_milestones") or ())
    if kind == "multistep" and not milestones:
        raise InputError("--lr-schedule multistep needs --lr-milestones E1,E2,... (the epochs from which the rate is lowered)")
    if kind != "multistep" and milestones:
        raise InputError(f"--lr-milestones applies to --lr-schedule multistep, not {kind}")
    if milestones and milestones[-1] > c["epochs"]:
        raise InputError(f"--lr-milestones {','.join(map(str, milestones))}: epoch {milestones[-1]} is past --epochs {c['epochs']}")
    if c.get("lr_patience", 0) < 0:
        raise InputError(f"--lr-patience must be >= 0, got {c['lr_patience']}")
    if kind == "plateau" and c["warmup_epochs"] >= c["epochs"]:
        raise InputError(f"--lr-schedule plateau starts after the {c['warmup_epochs']} warm-up epochs, but --epochs is "
                         f"{c['epochs']}")
