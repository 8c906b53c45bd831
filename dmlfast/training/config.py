"""A training run's configuration: the recipe for (dataset, loss, model) with the command line's
flags applied, its checks, and which of its keys may change when a run is resumed.

A configuration is a plain dict (``config.json`` and every checkpoint hold it): the fields of
:class:`dmlfast.recipes.Recipe` plus the run's own keys (``dataset``, ``data_root``, ``loss``,
``device``, ``amp``, ``loader``, ``workers``, ``output``, ``seed``, ``ks``, ...). Every problem is an
:class:`~dmlfast.checks.InputError` naming the flag.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

from dmlfast.checks import InputError, canonical_name, require_at_least

#: Recall@K cut-offs of each dataset's published evaluation.
DATASET_KS = {"CUB": (1, 2, 4, 8), "Cars196": (1, 2, 4, 8), "SOP": (1, 10, 100, 1000),
              "In-shop": (1, 10, 20, 30, 40, 50), "Omniglot": (1, 2, 4, 8), "glyphs": (1, 2, 4, 8),
              "folder": (1, 2, 4, 8), "csv": (1, 2, 4, 8)}
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: Configuration keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {"resume", "overwrite", "output", "device", "workers", "data_root", "progress", "loader", "tensorboard",
                     "wandb", "compile"}
#: Configuration keys a checkpoint may lack, with the value a run without them had.
LATER_KEYS = {"shard_proxies": False, "lr_schedule": "step", "lr_milestones": [], "lr_patience": 4, "crop_scale": None,
              "frozen_layers": []}
#: Recipe fields held as tuples, written to the configuration as lists (as config.json reads them back).
_LIST_FIELDS = ("lr_milestones", "crop_scale", "frozen_layers")
#: Flags that, when given, replace the recipe's field of the same name.
RECIPE_FLAGS = ("weights", "embedding_size", "pooling", "optimizer", "lr", "proxy_lr_mult", "weight_decay", "batch_size",
                "epochs", "warmup_epochs", "lr_schedule", "lr_step", "lr_gamma", "lr_milestones", "lr_patience", "grad_clip",
                "image_size", "samples_per_class")
#: Flags of the losses' constructors (``loss_kwargs``), each with the parameter names it sets: the
#: first one the recipe's loss takes (--scale is CosFace's s, Proxy-Anchor's alpha, SoftTriple's la).
LOSS_FLAGS = {"k": ("k",), "temperature": ("temperature",), "momentum": ("momentum",), "margin": ("margin",),
              "scale": ("scale", "alpha", "la"), "centers": ("sub_centers", "centers_per_class")}


def make_config(args) -> Dict[str, Any]:
    """The final configuration: the recipe for (dataset, loss, model) with the flags of ``args``
    (``python -m dmlfast.train``'s parsed command line) applied."""
    from dmlfast.recipes import resolve_recipe

    try:
        recipe = resolve_recipe(args.dataset, args.loss, args.model)
    except ValueError as error:
        raise InputError(str(error)) from error
    config = recipe.replace(**_recipe_overrides(args, recipe)).to_dict()
    config.update({k: list(config[k]) for k in _LIST_FIELDS if config[k] is not None})
    config.update(dataset=args.dataset, data_root=None if args.data_root is None else str(args.data_root), loss=args.loss,
                  device=args.device, amp=args.amp, loader=args.loader, workers=args.workers, eval_every=args.eval_every,
                  output=str(args.output), resume=args.resume, overwrite=args.overwrite, seed=args.seed, progress=args.progress,
                  ks=list(DATASET_KS[args.dataset]), binary_eval=args.binary_eval,
                  data_list=None if args.list is None else str(args.list), test_classes=args.test_classes,
                  tensorboard=args.tensorboard, wandb=args.wandb, shard_proxies=args.shard_proxies, compile=args.compile)
    _fit_input_to_backbone(config, args.pooling)
    check_config(config)
    return config


def _fit_input_to_backbone(config: Dict[str, Any], pooling_flag) -> None:
    """The recipe's pooling and image size fitted to its backbone (:func:`dmlfast.models.input_spec`): a
    backbone that pools itself gets ``pooling="backbone"``; on a real dataset, an image size left open
    becomes the backbone's input size when it differs from the dataset's default (the glyphs and
    Omniglot keep their own). ``InputError`` for a ``--pooling`` the backbone cannot take, or a timm
    model that cannot be had."""
    from dmlfast.data import dataset_defaults
    from dmlfast.models import input_spec

    spec = input_spec(config["model"])
    if spec.pools_itself:
        if pooling_flag not in (None, "backbone"):
            raise InputError(f"--pooling {pooling_flag}: {config['model']} pools its features itself (a transformer's class "
                             "token, or timm's own head); leave --pooling out or pass --pooling backbone")
        config["pooling"] = "backbone"
    elif config["pooling"] == "backbone":
        raise InputError(f"--pooling backbone: {config['model']} returns a feature map, which dmlfast pools; use avg+max, "
                         "avg or max")
    defaults = dataset_defaults(config["dataset"])
    if config["image_size"] is None and not defaults.own_size and spec.image_size != defaults.image_size:
        config["image_size"] = spec.image_size


def _recipe_overrides(args, recipe) -> Dict[str, Any]:
    """The recipe fields the flags of ``args`` replace; ``InputError`` for a flag the loss does not take."""
    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if args.freeze_bn is not None:
        overrides["freeze_bn"] = args.freeze_bn == "on"
    if overrides.get("samples_per_class") == 0:
        overrides["samples_per_class"] = None
    if "image_size" in overrides:
        overrides["resize_size"] = None
    if "lr_milestones" in overrides and args.lr_schedule is None:
        overrides["lr_schedule"] = "multistep"
    if args.proxy_synthesis is not None:
        overrides["proxy_synthesis"] = args.proxy_synthesis
    if args.mixup is not None:
        if args.loss in ("ProxyISA", "Moving"):
            raise InputError(f"--mixup does not apply to --loss {args.loss}: its per-step state update would run on "
                             "the mixed batch too")
        overrides["mixup"] = args.mixup == "on"
    if args.uncertainty_l2_norm is not None:
        if args.loss != "IDML":
            raise InputError(f"--uncertainty-l2-norm does not apply to --loss {args.loss}")
        overrides["normalize_uncertainty"] = args.uncertainty_l2_norm == "on"
    for flag, names in LOSS_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        name = next((n for n in names if n in recipe.loss_kwargs), None)
        if name is None:
            raise InputError(f"--{flag} does not apply to --loss {args.loss} (it does to {', '.join(_losses_taking(names, args))})")
        _check_loss_flag(flag, value)
        overrides.setdefault("loss_kwargs", dict(recipe.loss_kwargs))[name] = value
    return overrides


def _losses_taking(names, args) -> list:
    """The losses whose recipe for this dataset and model has one of the parameters ``names``."""
    from dmlfast.losses import LOSSES
    from dmlfast.recipes import resolve_recipe

    return [loss for loss in LOSSES if any(n in resolve_recipe(args.dataset, loss, args.model).loss_kwargs for n in names)]


def _check_loss_flag(flag: str, value) -> None:
    """``InputError`` for a --margin, --scale or --centers no loss can take (each loss checks its own
    ranges too, naming its parameter)."""
    if flag == "margin" and not math.isfinite(value):
        raise InputError(f"--margin must be a finite number, got {value}")
    if flag == "scale" and not (value > 0 and math.isfinite(value)):
        raise InputError(f"--scale must be a positive number, got {value}")
    if flag == "centers":
        require_at_least("--centers", value, 1)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_config(c: Dict[str, Any]) -> None:
    """``InputError`` for the first value of ``c`` a run cannot use (ranges, data, files, packages)."""
    for name in ("embedding_size", "batch_size", "epochs", "eval_every"):
        require_at_least(_flag(name), c[name], 1)
    for name in ("warmup_epochs", "lr_step", "workers"):
        require_at_least(_flag(name), c[name], 0)
    for name in ("lr", "proxy_lr_mult", "lr_gamma"):
        if not (c[name] > 0 and math.isfinite(c[name])):
            raise InputError(f"{_flag(name)} must be a positive number, got {c[name]}")
    for name in ("weight_decay", "grad_clip"):
        if not (c[name] >= 0 and math.isfinite(c[name])):
            raise InputError(f"{_flag(name)} must be >= 0, got {c[name]}")
    if c["image_size"] is not None:
        require_at_least("--image-size", c["image_size"], 8)
    from dmlfast.training.schedule import check_schedule

    check_schedule(c)
    m = c["samples_per_class"]
    if m is not None and (m < 1 or c["batch_size"] % m):
        raise InputError(f"--samples-per-class must be >= 1 and divide --batch-size ({c['batch_size']}), got {m}")
    from dmlfast.training.run_folder import check_output_folder

    check_output_folder(c["output"])
    require_data_root(c)
    if c["data_root"] is not None and c["dataset"] != "glyphs" and not Path(c["data_root"]).is_dir():
        raise InputError(f"--data-root: no such folder: {c['data_root']}")
    check_dataset_options(c)
    check_shard_proxies(c)
    from dmlfast.training.logs import check_trackers

    check_trackers(c.get("tensorboard", False), c.get("wandb", False))
    if c["weights"] not in ("imagenet", "pretrained", "none") and not Path(c["weights"]).is_file():  # before any data is prepared
        raise InputError(f"--weights: no such file: {c['weights']} (give 'imagenet', 'pretrained', 'none' or the path of a "
                         "state dict)")


def check_shard_proxies(c: Dict[str, Any]) -> None:
    """``--shard-proxies`` only for the losses :mod:`dmlfast.sharded` has, without Proxy Synthesis."""
    if not c.get("shard_proxies"):
        return
    from dmlfast.sharded import SHARDED_LOSSES

    if c["loss"] not in SHARDED_LOSSES:
        raise InputError(f"--shard-proxies: class-sharded proxies exist for --loss {', '.join(SHARDED_LOSSES)}, not {c['loss']}")
    if c["proxy_synthesis"] is not None:
        raise InputError("--shard-proxies cannot be combined with --proxy-synthesis (its synthetic proxies mix rows of "
                         "every shard)")


def require_data_root(c: Dict[str, Any]) -> None:
    """``--data-root`` for every dataset but the built-in glyphs."""
    if c["dataset"] != "glyphs" and c["data_root"] is None:
        raise InputError(f"--dataset {c['dataset']} needs --data-root DIR, the folder holding it")


def check_dataset_options(c: Dict[str, Any]) -> None:
    """``--list`` only and always with ``--dataset csv``; ``--test-classes`` only with folder/csv."""
    if c["dataset"] == "csv" and c.get("data_list") is None:
        raise InputError("--dataset csv needs --list FILE.csv, the rows path,label[,split]")
    if c["dataset"] != "csv" and c.get("data_list") is not None:
        raise InputError(f"--list applies to --dataset csv, not {c['dataset']}")
    if c["dataset"] not in ("folder", "csv") and c.get("test_classes") is not None:
        raise InputError(f"--test-classes applies to --dataset folder or csv, not {c['dataset']}")


def dataset_options(config: Dict[str, Any]) -> Dict[str, Any]:
    """The ``load_dataset`` options of ``config``: list file, held-out classes and seed for folder/csv."""
    if config["dataset"] not in ("folder", "csv"):
        return {}
    options = {"test_classes": config.get("test_classes"), "seed": config["seed"]}
    if config["dataset"] == "csv":
        options["list_file"] = config.get("data_list")
    return options


def apply_dataset_arguments(config: dict, args) -> dict:
    """``config`` (a checkpoint's) with the ``--dataset``, ``--data-root``, ``--list`` and
    ``--test-classes`` of ``args`` applied; ``InputError`` when they do not fit."""
    from dmlfast.data import DATASETS

    config = dict(config)
    if args.dataset is not None:
        try:
            dataset = canonical_name("dataset", args.dataset, DATASETS)
        except ValueError as error:
            raise InputError(f"--dataset: {error}") from error
        config.update(dataset=dataset, data_root=None, data_list=None, test_classes=None)
    if args.data_root is not None:
        config["data_root"] = str(args.data_root)
    if args.list is not None:
        config["data_list"] = str(args.list)
    if args.test_classes is not None:
        config["test_classes"] = args.test_classes
    require_data_root(config)
    check_dataset_options(config)
    return config


def compare_configs(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """``InputError`` when the checkpoint ``path``'s configuration ``saved`` differs from ``current``
    in a key outside :data:`RESUMABLE_CHANGES`."""
    saved = {**LATER_KEYS, **saved}
    differ = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now" for k in differ[:4])
        raise InputError(f"--resume: {path} is from another configuration ({shown}); use the same flags or another --output")


def check_world_size(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """``InputError`` unless the checkpoint's run had as many processes as this one (a configuration
    without ``world_size`` is a single process's)."""
    written, now = saved.get("world_size", 1), current["world_size"]
    if written != now:
        how = "python -m dmlfast.train" if written == 1 else f"torchrun --nproc-per-node {written}"
        raise InputError(f"--resume: {path} was written by {written} process(es), this run has {now}; the batches, their "
                         f"shards and the optimizer steps depend on it: resume with {how}, or start afresh in another --output")
