"""The training loop of ``python -m dmlfast.train``, from a configuration (:mod:`.config`) to the
run's summary::

    run = start_run(config, device)        # build; resume from last.pt, or evaluate the untrained model
    for epoch in remaining epochs:
        losses = train_epoch(run, epoch)   # train_step on every batch
        end_epoch(run, epoch, losses)      # learning-rate step, evaluation, history, checkpoints
    finish_run(run)                        # curves.png, summary.json, the before/after table

:func:`train` wraps it for torchrun: one process per device inside a process group
(:mod:`.distributed`); rank 0 alone prints and writes the run's files.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from dmlfast.checks import InputError
from dmlfast.training import distributed, run_folder
from dmlfast.training.checkpoint import CheckpointWriteError, rng_state, save_checkpoint, set_rng_state
from dmlfast.training.config import check_world_size, compare_configs
from dmlfast.training.embedding import evaluate_model
from dmlfast.training.logs import LogWriteError, NullLogger, RunLogger, plot_curves
from dmlfast.training.mixup import mixup_loss
from dmlfast.training.schedule import EpochSchedule
from dmlfast.training.setup import (amp_dtype, epoch_seed, make_eval_loaders, make_loss, make_model, make_optimizer,
                                    make_train_loader, make_validation_loaders, read_checkpoint, resolve_device, resolve_loader,
                                    seed_everything, training_splits)
from dmlfast.training.throughput import EpochClock, prepare_model, to_model_layout

say = distributed.print_main
#: What a ``last.pt`` must hold to be resumed (the proxies and optimizer state may be in the shards).
RESUME_ENTRIES = ("epoch", "model", "scheduler", "rng", "history", "best")


def train(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run (or resume) the training ``config`` describes; returns ``{"before", "after", "best", "history", ...}``.

    Under torchrun (``WORLD_SIZE`` > 1) this process joins the process group on its own device for
    the run, left again at the end (errors included), and trains data-parallel;
    ``config["world_size"]`` is set to the number of processes (1 otherwise)."""
    processes = distributed.requested_world_size()
    if processes > 1 and config["loss"] == "ProxyISA":
        raise InputError(f"--loss ProxyISA cannot train in {processes} processes: its per-class counters and cross-batch "
                         "memory are updated inside the loss from the local batch, so the ranks would diverge; "
                         "run it in one process")
    device = distributed.device_for_rank(config["device"], distributed.local_rank()) if processes > 1 \
        else resolve_device(config["device"])
    with distributed.process_group(device):
        return run_training(dict(config, world_size=processes), device)


def run_training(config: Dict[str, Any], device) -> Dict[str, Any]:
    """:func:`train`'s run on ``device``, inside the process group when there is one; ``config`` has
    ``world_size``. The output folder is locked for the run (:mod:`.run_folder`); a checkpoint or log
    that cannot be written (a full disk) ends it with an ``InputError`` saying what is intact."""
    with claimed_output(config) as resumable:
        try:
            run = start_run(config, device, resumable)
            for epoch in range(run.start_epoch + 1, run.config["epochs"] + 1):
                losses = train_epoch(run, epoch)
                end_epoch(run, epoch, losses)
            return finish_run(run)
        except CheckpointWriteError as error:
            raise InputError(f"{error}; free some space, then continue with --resume") from error
        except LogWriteError as error:
            raise InputError(f"{error}; the checkpoints written before are intact: free some space, then continue with "
                             "--resume") from error


@contextmanager
def claimed_output(config: Dict[str, Any]) -> Iterator[bool]:
    """Rank 0 holds the output folder's lock while the ``with`` block runs and claims the folder
    (:func:`.run_folder.claim`); every rank gets whether there is a ``last.pt`` to resume, or raises
    rank 0's ``InputError`` (another live run, an earlier run's results not to be replaced)."""
    with ExitStack() as stack:
        outcome: Any = None
        if distributed.is_main():
            try:
                stack.enter_context(run_folder.locked(config["output"]))
                outcome = run_folder.claim(config["output"], config["resume"], config.get("overwrite", False))
            except InputError as error:
                outcome = error
        outcome = distributed.broadcast_object(outcome)
        if isinstance(outcome, InputError):
            raise outcome
        yield outcome


@dataclass
class Run:
    """What a training run holds from one step to the next."""

    config: Dict[str, Any]
    device: torch.device
    dtype: Optional[torch.dtype]  # autocast dtype, None for float32
    out: Path
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: Any
    scheduler: EpochSchedule
    scaler: Optional[Any]  # a GradScaler with fp16 autocast
    train_loader: Any
    eval_loaders: Any
    logger: Any
    start_time: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, Any] = field(default_factory=dict)
    start_epoch: int = 0
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    # The step's modules: under torchrun, DDP wrappers rebuilt whenever the trainable set changes.
    model_inputs: Optional[distributed.LossInputs] = None
    forward: Any = None
    criterion: Any = None
    replicated_for: Optional[tuple] = None
    params: List[torch.nn.Parameter] = field(default_factory=list)  # clipped model parameters
    proxy_params: List[torch.nn.Parameter] = field(default_factory=list)  # empty for moving proxies (a buffer)
    backbone_params: List[torch.nn.Parameter] = field(default_factory=list)  # frozen during warm-up
    validation_loaders: Any = None  # the plateau schedule's held-out training classes
    compiling: bool = False  # the next step compiles the backbone (--compile): left out of images/s

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def world(self) -> int:
        return self.config["world_size"]

    @property
    def sharded(self) -> bool:
        return bool(self.config.get("shard_proxies"))

    @property
    def progress(self) -> bool:
        return self.config["progress"] and distributed.is_main()


# ------------------------------------------------------------------------------------------ start

def start_run(config: Dict[str, Any], device, resumable: bool) -> Run:
    """Build the run's parts, then resume it from ``last.pt`` (``resumable``: ``--resume`` found one,
    :func:`claimed_output`) or evaluate the untrained model and write the first checkpoints."""
    start_time = time.perf_counter()
    dtype = amp_dtype(config["amp"], device)
    config = dict(config, loader=resolve_loader(config["loader"], device))
    out = Path(config["output"])
    state = _previous_run(config, out) if resumable else None
    distributed.barrier()  # every rank has looked at last.pt before rank 0 writes anything
    with distributed.main_first():  # a dataset rendered or weights downloaded into a shared cache: by rank 0 alone
        splits, validation = training_splits(config)
        seed_everything(config["seed"])
        model = prepare_model(make_model(config), device, config.get("compile", False))
    loss_fn = make_loss(config, splits.train.num_classes).to(device)
    optimizer = make_optimizer(model, loss_fn, config)
    scheduler = EpochSchedule(optimizer, config)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    train_loader = make_train_loader(config, splits, device)
    eval_loaders = make_eval_loaders(config, splits, device)
    resume_step = None if state is None else state["epoch"] * len(train_loader)
    logger = _open_outputs(config, out, device, dtype, train_loader, splits.train, resume_step)
    run = Run(config, device, dtype, out, model, loss_fn, optimizer, scheduler, scaler, train_loader, eval_loaders, logger,
              start_time, validation_loaders=make_validation_loaders(config, validation, device))
    if state is not None:
        _resume(run, state)
    else:
        _evaluate_untrained(run)
        save_checkpoints(run, 0, run.last_path, run.best_path)
    run.step = run.start_epoch * len(train_loader)
    run.params = [p for p in model.parameters() if p.requires_grad]
    run.proxy_params = list(loss_fn.parameters())
    run.backbone_params = model.backbone_parameters()  # fixed now: warm-up toggles requires_grad on them
    run.model_inputs = distributed.LossInputs(model, uncertainty=config["loss"] == "IDML")
    return run


def _previous_run(config: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """The checkpoint ``last.pt`` in ``out`` to resume, checked against this run."""
    last_path = out / "last.pt"
    own = () if config.get("shard_proxies") else ("loss", "optimizer")  # sharded: in the proxy shards
    state = read_checkpoint(last_path, "--resume", entries=(*RESUME_ENTRIES, *own))
    check_world_size(state["config"], config, last_path)
    compare_configs(dict(state["config"], world_size=config["world_size"]), config, last_path)
    return state


def _open_outputs(config: Dict[str, Any], out: Path, device, dtype, train_loader, train_split, resume_step: Optional[int]):
    """Write ``config.json`` and print the configuration (rank 0); the run's logger (rank 0's writes
    ``log.jsonl``, cut back to ``resume_step`` when resuming)."""
    if distributed.is_main():
        _write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    say("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in config.items()))
    say(f"device {device}, autocast {dtype or 'off'}, loader {train_loader.backend}, train {train_split!r}")
    world = config["world_size"]
    if world > 1:
        say(f"data-parallel: {world} processes ({distributed.backend_for(device)}), global batch {world} x "
            f"{config['batch_size']} = {world * config['batch_size']} images per step")
    if not distributed.is_main():
        return NullLogger()
    return RunLogger(out, tensorboard=config.get("tensorboard", False), wandb=config.get("wandb", False), config=config,
                     resume_step=resume_step)


def _write_text(path: Path, text: str) -> None:
    """Write one of the run's small files; :class:`LogWriteError` naming it when that fails (a full disk)."""
    try:
        path.write_text(text)
    except OSError as error:
        raise LogWriteError(f"cannot write {path}: {error.strerror or error}") from error


def _resume(run: Run, state: Dict[str, Any]) -> None:
    """Load the model, proxies, optimizer, scheduler, scaler, RNG states and history of ``state`` (``last.pt``)."""
    run.model.load_state_dict(state["model"])
    own = _load_proxy_shard(run.last_path, run.config, state["epoch"]) if run.sharded else state
    run.loss_fn.load_state_dict(own["loss"])
    run.optimizer.load_state_dict(own["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.history, run.best, run.start_epoch = state["history"], state["best"], state["epoch"]
    say(f"resumed from {run.last_path} after epoch {run.start_epoch}")


def _load_proxy_shard(last_path: Path, config: Dict[str, Any], epoch: int) -> Dict[str, Any]:
    """This rank's ``{"loss", "optimizer"}`` state saved beside ``last_path`` by a run with sharded
    proxies; ``InputError`` when it is missing or from another epoch than ``last_path`` (``epoch``)."""
    path = distributed.shard_checkpoint_path(last_path, distributed.rank(), config["world_size"])
    shard = read_checkpoint(path, "--resume", "with --shard-proxies every process saves its proxies there",
                            entries=("epoch", "loss", "optimizer"))
    if shard["epoch"] != epoch:
        raise InputError(f"--resume: {path} holds the proxies after epoch {shard['epoch']}, {last_path} the model after "
                         f"epoch {epoch} (a run stopped while saving); start afresh in another --output")
    return shard


def _evaluate_untrained(run: Run) -> None:
    """Epoch 0 of the history: the metrics of the model before training."""
    before = evaluate_model(run.model, run.eval_loaders, run.config, run.device, run.dtype, run.progress)
    run.history = [{"epoch": 0, "loss": None, **before}]
    run.best = {"epoch": 0, "recall@1": before["recall@1"]}
    run.start_epoch = 0
    run.logger.log("eval", 0, epoch=0, **before)
    say(f"before training: Recall@1 {before['recall@1']:.4f}, MAP@R {before['map@r']:.4f}")


def save_checkpoints(run: Run, epoch: int, *paths: Path) -> None:
    """The checkpoint after ``epoch`` to ``paths``, written by the rank(s) :func:`distributed.writes_checkpoints`
    names. With sharded proxies, every rank also writes its proxies and optimizer state beside each
    path (:func:`distributed.shard_checkpoint_path`); the main file then holds neither."""
    own = {"loss": run.loss_fn.state_dict(), "optimizer": run.optimizer.state_dict()}
    if run.sharded:
        for path in paths:
            save_checkpoint({"config": run.config, "epoch": epoch, **own},
                            distributed.shard_checkpoint_path(path, distributed.rank(), run.world))
    if not distributed.writes_checkpoints():
        return
    state = {"config": run.config, "epoch": epoch, "model": run.model.state_dict(),
             **(dict.fromkeys(own) if run.sharded else own), "scheduler": run.scheduler.state_dict(),
             "scaler": None if run.scaler is None else run.scaler.state_dict(), "rng": rng_state(),
             "history": run.history, "best": run.best}
    for path in paths:
        save_checkpoint(state, path)


# ------------------------------------------------------------------------------------------ epochs

def train_epoch(run: Run, epoch: int) -> List[float]:
    """One pass over this rank's share of the training set; returns each step's loss (mean over ranks)."""
    warm = _start_epoch(run, epoch)
    losses = []
    clock = EpochClock(skip_first=run.compiling)
    run.compiling = False
    bar = tqdm(run.train_loader, desc=f"epoch {epoch}/{run.config['epochs']}" + (" (warm-up)" if warm else ""),
               disable=not run.progress, unit="batch", dynamic_ncols=True)
    for images, labels in bar:
        step_start = time.perf_counter()
        value = train_step(run, images, labels, epoch)
        losses.append(value)
        run.step += 1
        clock.step_done(step_start, len(labels) * run.world)
        rate = clock.images_per_s
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
        run.logger.log("step", run.step, epoch=epoch, loss=value, lr=run.optimizer.param_groups[0]["lr"], images_per_s=rate)
    run.train_seconds += clock.seconds
    run.images_seen += clock.images
    return losses


def _start_epoch(run: Run, epoch: int) -> bool:
    """Seed the epoch, tell the loader and the loss, freeze or unfreeze the backbone (warm-up) and,
    when that changed what trains, replicate the step's modules again; returns whether this is a warm-up epoch."""
    seed_everything(epoch_seed(run.config["seed"], epoch))
    run.train_loader.set_epoch(epoch)
    if hasattr(run.loss_fn, "set_epoch"):
        run.loss_fn.set_epoch(epoch - 1)  # the losses count epochs from 0
    warm = epoch <= run.config["warmup_epochs"]
    for p in run.backbone_params:
        p.requires_grad_(not warm)
    if distributed.trainable_signature(run.model_inputs, run.loss_fn) != run.replicated_for:  # first epoch, end of warm-up
        run.forward = run.criterion = None  # the old DDP wrappers go before the new ones hook the parameters
        run.forward, run.criterion = distributed.replicate(run.model_inputs, run.loss_fn, run.device, sharded_loss=run.sharded)
        run.replicated_for = distributed.trainable_signature(run.model_inputs, run.loss_fn)
        run.compiling = bool(run.config.get("compile"))  # a new set of trained parameters: compiled again
    run.model.train()
    return warm


def _loss_inputs(run: Run, images):
    """The model outputs the loss takes before the labels: (μ,), or IDML's (μ, v)."""
    with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
        return run.forward(images)


def train_step(run: Run, images, labels, epoch: int) -> float:
    """One optimizer step on the batch (plus mixup and the moving-proxy update when configured);
    returns the loss, averaged over ranks. ``InputError`` (:func:`diverged`) when the loss, or the
    embeddings it is computed from, are no longer finite."""
    images = to_model_layout(run.model, images)
    try:
        inputs = _loss_inputs(run, images)
        loss = run.criterion(*inputs, labels)
        if run.config.get("mixup"):
            loss = loss + mixup_loss(lambda mixed: _loss_inputs(run, mixed), run.criterion, images, labels)
    except ValueError as error:  # the losses refuse NaN/Inf (or norm-overflowing) embeddings
        if not _is_non_finite(error):
            raise
        raise diverged(run, epoch, "the embeddings") from error
    run.optimizer.zero_grad(set_to_none=True)
    _backward_and_update(run, loss)
    if hasattr(run.loss_fn, "update_proxies"):  # every rank moves its copy by the whole global batch
        run.loss_fn.update_proxies(distributed.all_gather_rows(inputs[0].detach()), distributed.all_gather_rows(labels))
    value = distributed.mean_over_ranks(loss)
    if not math.isfinite(value):
        raise diverged(run, epoch, f"the loss ({value})")
    return value


def _is_non_finite(error: ValueError) -> bool:
    return "NaN or Inf" in str(error) or "overflows" in str(error)


def diverged(run: Run, epoch: int, what: str) -> InputError:
    """The one-line error of a run whose numbers stopped being finite at the current step."""
    clip = run.config["grad_clip"]
    remedy = "enable --grad-clip" if clip <= 0 else f"lower --grad-clip (now {clip:g})"
    return InputError(f"the loss became NaN/Inf at step {run.step + 1} (epoch {epoch}; {what} stopped being finite): the "
                      f"training diverged; lower --lr (now {run.config['lr']:g}) or {remedy}, and start again with "
                      "--overwrite")


def _backward_and_update(run: Run, loss) -> None:
    """Backward (scaled with fp16), gradient-value clipping, optimizer step."""
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    clip = run.config["grad_clip"]
    if clip > 0:
        torch.nn.utils.clip_grad_value_(run.params, clip)
        if run.config["clip_proxies"] and run.proxy_params:
            torch.nn.utils.clip_grad_value_(run.proxy_params, clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def end_epoch(run: Run, epoch: int, losses: List[float]) -> None:
    """Learning-rate step, evaluation when due, the epoch's record in the history and the log, and
    the checkpoints (``best.pt`` too when Recall@1 improved)."""
    distributed.sync_buffers(run.model)
    record = {"epoch": epoch, "loss": float(np.mean(losses))}
    if run.scheduler.needs_validation(epoch):
        validation = _evaluate(run, epoch, run.validation_loaders, "the validation embeddings")
        record["validation_recall@1"] = validation["recall@1"]
    run.scheduler.step(epoch, record.get("validation_recall@1"))
    if epoch % run.config["eval_every"] == 0 or epoch == run.config["epochs"]:
        metrics = _evaluate(run, epoch, run.eval_loaders, "the evaluation's embeddings")
        record.update(metrics)
        say(f"epoch {epoch}: loss {record['loss']:.4f}, Recall@1 {metrics['recall@1']:.4f}, MAP@R {metrics['map@r']:.4f}")
    else:
        say(f"epoch {epoch}: loss {record['loss']:.4f}")
    run.history.append(record)
    run.logger.log("epoch", run.step, **record)
    improved = record.get("recall@1", -1.0) > run.best["recall@1"]
    if improved:
        run.best = {"epoch": epoch, "recall@1": record["recall@1"]}
    save_checkpoints(run, epoch, *((run.best_path, run.last_path) if improved else (run.last_path,)))


def _evaluate(run: Run, epoch: int, loaders, what: str) -> Dict[str, float]:
    """:func:`evaluate_model` on ``loaders``; :func:`diverged` when ``what`` are no longer finite."""
    try:
        return evaluate_model(run.model, loaders, run.config, run.device, run.dtype, run.progress)
    except ValueError as error:  # the metrics refuse NaN/Inf embeddings
        if not _is_non_finite(error):
            raise
        raise diverged(run, epoch, what) from error


# ------------------------------------------------------------------------------------------ end

def finish_run(run: Run) -> Dict[str, Any]:
    """Close the logs, write ``curves.png`` and ``summary.json`` (rank 0), print the before/after table;
    returns the summary."""
    run.logger.close()
    evaluated = [h for h in run.history if "recall@1" in h]
    before, after = evaluated[0], evaluated[-1]
    seconds = time.perf_counter() - run.start_time
    images_per_s = run.images_seen / run.train_seconds if run.train_seconds > 0 else float("nan")
    summary = {"before": before, "after": after, "best": run.best, "history": run.history, "seconds": seconds,
               "images_per_s": images_per_s, **run.scheduler.summary()}
    if distributed.is_main():
        try:
            plot_curves(run.history, run.out / "curves.png")
        except OSError as error:
            raise LogWriteError(f"cannot write {run.out / 'curves.png'}: {error.strerror or error}") from error
        _write_text(run.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    say(format_summary(before, after, run.best, seconds, images_per_s))
    if run.scheduler.rerun_flags():
        say(f"plateau schedule: learning rate lowered from epochs {run.scheduler.drops or 'none'}, best validation epoch "
            f"{run.scheduler.best[0]}; the published second run, on all training classes: {run.scheduler.rerun_flags()}")
    return summary


def format_summary(before: Dict[str, float], after: Dict[str, float], best: Dict[str, Any], seconds: float,
                   images_per_s: float) -> str:
    """The end-of-run table: each metric before and after training (fractions in [0, 1], as everywhere),
    the best epoch, time and speed."""
    names = [k for k in before if k.startswith("recall@")] + ["map@r"]
    names += [k for k in before if k.startswith("binary_recall@")] + [k for k in before if k == "binary_map@r"]
    lines = [f"{'metric':<18}{'before':>9}{'after':>9}{'change':>9}", "-" * 45]
    for name in names:
        b, a = before.get(name, float("nan")), after.get(name, float("nan"))
        lines.append(f"{name:<18}{b:>9.4f}{a:>9.4f}{a - b:>+9.4f}")
    lines.append("-" * 45)
    lines.append(f"best Recall@1 {best['recall@1']:.4f} at epoch {best['epoch']}")
    lines.append(f"time {seconds:.1f} s, training {images_per_s:.0f} images/s")
    return "\n".join(lines)
