"""A run's parts, built from its configuration (:mod:`.config`): device, autocast dtype, dataset,
loaders, model, loss and optimizer, and a trained model restored from a checkpoint. Shared by the
training loop and by the commands that use a checkpoint (evaluate, retrieve, plot). Every problem
the user can fix is an :class:`~dmlfast.checks.InputError` naming the flag.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from dmlfast import data
from dmlfast.checks import InputError, canonical_name, one_of
from dmlfast.training import distributed
from dmlfast.training.checkpoint import CheckpointError, load_checkpoint
from dmlfast.training.config import AMP_MODES, apply_dataset_arguments, dataset_options


def resolve_device(name: Optional[str]) -> torch.device:
    """``torch.device`` for ``--device`` (default: cuda when available); ``InputError`` when it cannot be used."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"--device: {error}") from error
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (no GPU, or torch without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_loader(name: str, device) -> str:
    """``"dali"``, ``"nvjpeg"`` or ``"torch"`` for ``--loader name``: ``auto`` is, on CUDA, DALI when
    installed, else torchvision's GPU decoding when it works there, else CPU workers; on a CPU, CPU
    workers. ``InputError`` when DALI is asked for and missing, or GPU decoding on a GPU without it."""
    if name not in data.LOADERS:
        raise InputError(f"--loader must be one of {', '.join(data.LOADERS)}, got {name!r}")
    if name == "dali" and not data.dali_available():
        raise InputError(f"--loader dali: NVIDIA DALI is not installed ({data.DALI_INSTALL_HINT}); or use --loader torch")
    if name == "nvjpeg" and device.type == "cuda" and not data.gpu_decode_available(device):
        raise InputError(f"--loader nvjpeg: torchvision cannot decode JPEGs on {device} (a torchvision build without "
                         "nvJPEG); use --loader torch")
    if name == "auto":
        return data.choose_loader("auto", device) if device.type == "cuda" else "torch"
    return name


def amp_dtype(mode: str, device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp mode`` on ``device`` (``None``: float32)."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp_dtype: mode must be one of {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def read_checkpoint(path, flag: str, note: Optional[str] = None, entries: Sequence[str] = ()) -> Dict[str, Any]:
    """The checkpoint at ``path`` (read without running code from it); ``InputError``
    ``"{flag}: {why} ({note})"`` when it cannot be read or lacks one of ``entries``."""
    try:
        return load_checkpoint(path, entries)
    except CheckpointError as error:
        raise InputError(f"{flag}: {error}" + (f" ({note})" if note else "")) from error


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` of a run seeded ``seed`` (torch, numpy and random are reseeded with it)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------- data

def load_splits(config: Dict[str, Any]):
    """The dataset's splits; missing data becomes a one-line ``InputError`` with the fix."""
    try:
        return data.load_dataset(config["dataset"], config["data_root"], **dataset_options(config))
    except data.DatasetLayoutError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        if config["dataset"] in ("folder", "csv"):  # the user's own data: the reader's message says what to fix
            raise InputError(" ".join(lines)) from error
        source = next((line for line in lines if "published at" in line), "")
        hint = f"; {source}" if source else ""
        raise InputError(f"{lines[0]}{hint}; point --data-root at the extracted dataset (layouts: help(dmlfast.data))") from error


def dataset_split(config, args, split: Optional[str]):
    """``(ImageList of split, the data configuration)``: ``split`` (default: the held-out one) of the
    dataset that ``config`` with the dataset flags of ``args`` (:func:`.config.apply_dataset_arguments`) names."""
    data_config = apply_dataset_arguments(config, args)
    available = load_splits(data_config).splits()
    name = split or ("test" if "test" in available else "gallery")
    if name not in available:
        raise InputError(f"--split: {data_config['dataset']} has no {name} split; it has {', '.join(available)}")
    return available[name], data_config


def image_options(config: Dict[str, Any]) -> Dict[str, Any]:
    """The loader's image options of a run: its crop size, the resize before the evaluation crop (only
    with a crop size of its own; otherwise both are the dataset's defaults), the training crops' area
    range and the backbone's normalization."""
    from dmlfast.models import input_spec

    resize_size = config.get("resize_size") if config["image_size"] is not None else None
    crop_scale = config.get("crop_scale")
    return {"image_size": config["image_size"], "resize_size": resize_size, "normalization": input_spec(config["model"]).normalization,
            "crop_scale": None if crop_scale is None else tuple(crop_scale)}


def effective_image_size(config: Dict[str, Any]) -> int:
    """The crop size the run's loaders give: ``config["image_size"]``, else the dataset's default."""
    return config["image_size"] if config["image_size"] is not None else data.dataset_defaults(config["dataset"]).image_size


def training_splits(config: Dict[str, Any]):
    """``(splits, validation split or None)``: the dataset's splits; with ``lr_schedule="plateau"`` the
    training split keeps the first half of its classes and the second half is the validation split
    (:func:`dmlfast.training.schedule.validation_split`)."""
    splits = load_splits(config)
    if config.get("lr_schedule") != "plateau":
        return splits, None
    from dmlfast.training.schedule import validation_split

    train, validation = validation_split(splits.train)
    return dataclasses.replace(splits, train=train), validation


def make_train_loader(config: Dict[str, Any], splits, device):
    """The training loader: ``config['batch_size']`` images per process, this rank's share of every epoch."""
    world = distributed.world_size()
    if len(splits.train) < config["batch_size"] * world:
        processes = f" x {world} processes" if world > 1 else ""
        raise InputError(f"--batch-size {config['batch_size']}{processes} is larger than the training set ({len(splits.train)} images)")
    return data.make_loader(splits.train, train=True, batch_size=config["batch_size"], device=device, loader=config["loader"],
                            samples_per_class=config["samples_per_class"], seed=config["seed"], num_workers=config["workers"],
                            shard_id=distributed.rank(), num_shards=world, **image_options(config))


def make_eval_loaders(config: Dict[str, Any], splits, device):
    """``(query loader, reference loader or None)``: the test split against itself, or In-shop's query
    vs gallery; under torchrun each rank's loaders yield its shard (global batches rank, rank + N, ...)."""
    if splits.test is not None:
        return _eval_loader(config, splits.test, device), None
    return _eval_loader(config, splits.query, device), _eval_loader(config, splits.gallery, device)


def make_validation_loaders(config: Dict[str, Any], validation, device):
    """The validation split's evaluation loaders ``(loader, None)`` (self-retrieval), or ``None`` without one."""
    return None if validation is None else (_eval_loader(config, validation, device), None)


def _eval_loader(config: Dict[str, Any], image_list, device):
    return data.make_loader(image_list, train=False, batch_size=max(256, config["batch_size"]), device=device,
                            loader=config["loader"], num_workers=config["workers"], shard_id=distributed.rank(),
                            num_shards=distributed.world_size(), **image_options(config))


# ------------------------------------------------------------------------------ model, loss, optimizer

def make_model(config: Dict[str, Any]):
    """The embedding model of ``config`` (weights loaded as ``config['weights']`` says)."""
    from dmlfast.models import build_model

    return build_model(config["model"], config["embedding_size"], weights=config["weights"], pooling=config["pooling"],
                       layer_norm=config["layer_norm"], freeze_bn=config["freeze_bn"],
                       uncertainty_head=config.get("loss") == "IDML",
                       normalize_uncertainty=config.get("normalize_uncertainty", True),
                       image_size=effective_image_size(config), frozen_layers=tuple(config.get("frozen_layers", ())))


def restore_model(config: Dict[str, Any], model_state: Dict[str, Any], device):
    """The model of a checkpoint's ``config`` (no pretrained download) with ``model_state`` loaded,
    on ``device``; ``InputError`` when the state does not fit that configuration."""
    model = make_model(dict(config, weights="none"))
    try:
        model.load_state_dict(model_state)
    except RuntimeError as error:
        raise InputError(f"--checkpoint: the model state does not fit the configuration saved with it ({error})") from error
    return model.to(device)


def load_model(checkpoint: Path, device_name: Optional[str]):
    """``(model in eval mode on the device, its training config, device, autocast dtype or None)`` of a checkpoint.

    Raises ``InputError`` for a missing or foreign checkpoint or an unusable device."""
    if not isinstance(checkpoint, (str, Path)):
        raise ValueError(f"load_model: checkpoint must be a path, got {type(checkpoint).__name__}")
    state = read_checkpoint(checkpoint, "--checkpoint", entries=("model",))
    config = dict(state["config"], weights="none")
    device = resolve_device(device_name)
    model = restore_model(config, state["model"], device).eval()
    return model, config, device, amp_dtype(config["amp"], device)


def make_loss(config: Dict[str, Any], num_classes: int):
    """The loss module named by ``config['loss']`` (:data:`dmlfast.losses.LOSSES`) with its proxies
    for ``num_classes`` classes: class-sharded with ``shard_proxies``, wrapped in Proxy Synthesis with
    ``proxy_synthesis``."""
    from dmlfast.losses import LOSSES, SYNTHESIS_LOSSES, ProxySynthesis

    try:
        name = canonical_name("loss", config["loss"], LOSSES)
    except ValueError as error:
        raise InputError(f"--loss: {error}") from error
    try:
        if config.get("shard_proxies"):
            from dmlfast.sharded import make_sharded_loss

            return make_sharded_loss(name, num_classes, config["embedding_size"], **config["loss_kwargs"])
        loss_fn = LOSSES[name](num_classes, config["embedding_size"], **config["loss_kwargs"])
    except (ValueError, TypeError) as error:
        raise InputError(f"--loss {name}: {error}") from error
    if config["proxy_synthesis"] is not None:
        if name not in SYNTHESIS_LOSSES:
            raise InputError(f"--proxy-synthesis wraps {one_of(SYNTHESIS_LOSSES)}, not {name}")
        alpha, mu = config["proxy_synthesis"]
        loss_fn = ProxySynthesis(loss_fn, alpha=alpha, mu=mu)
    return loss_fn


def param_groups(model, loss_fn, config):
    """The optimizer's groups ``backbone``, ``embedding`` and ``proxies`` with their learning rates
    (a loss without parameters, moving proxies, has no ``proxies`` group)."""
    groups = [
        {"name": "backbone", "params": model.backbone_parameters(), "lr": config["lr"]},
        {"name": "embedding", "params": model.embedding_parameters(), "lr": config["lr"] * config["embedding_lr_mult"]},
        {"name": "proxies", "params": list(loss_fn.parameters()), "lr": config["lr"] * config["proxy_lr_mult"]},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(model, loss_fn, config):
    """AdamW / Adam / SGD (momentum 0.9, Nesterov) over the backbone, embedding and proxy groups."""
    groups = param_groups(model, loss_fn, config)
    wd = config["weight_decay"]
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=wd, eps=config["adam_eps"])
    if config["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=config["lr"], weight_decay=wd, eps=config["adam_eps"])
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], weight_decay=wd, momentum=0.9, nesterov=True)
    raise InputError(f"unknown optimizer {config['optimizer']!r}")
