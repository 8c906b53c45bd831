"""``--tensorboard`` / ``--wandb``: the JSON-lines scalars mirrored to the trackers, and one-line errors without them.

The trackers are replaced by recording doubles (``tensorboard`` and ``wandb`` need not be installed):
what is checked is which scalars reach them, at which steps, with which run settings."""
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from dmlfast import train
from dmlfast.training import RunLogger, TrackingUnavailableError, check_trackers, logs


class _Writer:
    def __init__(self, folder, purge_step=None):
        self.folder, self.scalars, self.closed, self.purge_step = folder, [], False, purge_step
        _Writer.last = self

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


class _Run:
    def __init__(self, **settings):
        self.settings, self.logged, self.finished = settings, [], False

    def log(self, values, step):
        self.logged.append((dict(values), step))

    def finish(self):
        self.finished = True


@pytest.fixture
def trackers(monkeypatch):
    """Recording stand-ins for ``torch.utils.tensorboard.SummaryWriter`` and ``wandb.init``; returns the wandb module."""
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    module("tensorboard")
    module("torch.utils.tensorboard", SummaryWriter=_Writer)
    runs = []
    wandb = module("wandb", init=lambda **settings: runs.append(_Run(**settings)) or runs[-1], runs=runs)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return wandb


def test_missing_packages_name_the_pip_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: None)
    for flag in ("--tensorboard", "--wandb"):
        with pytest.raises(TrackingUnavailableError, match=f"pip install {flag[2:]}"):
            RunLogger(tmp_path, **{flag[2:]: True})
        assert train.main([flag, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"python -m dmlfast.train: error: {flag} needs the {flag[2:]} package, which is not installed: pip install {flag[2:]}"
    assert not (tmp_path / "o").exists()  # refused before any data or output
    with pytest.raises(ValueError, match="tensorboard must be a bool"):
        check_trackers(tensorboard="yes")


def test_logger_mirrors_the_json_lines_numbers(trackers, tmp_path):
    logger = RunLogger(tmp_path, tensorboard=True, wandb=True, config={"lr": 0.1})
    logger.log("eval", 0, epoch=0, recall_at_1=0.5, note="text", flag=True)
    logger.log("step", 1, loss=2.5, lr=0.1)
    logger.log("epoch", 1, epoch=1, loss=float("nan"))
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[2]["loss"] is None
    expected = [(f"{r['kind']}/{k}", v, r["step"]) for r in records for k, v in r.items()
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    writer = _Writer.last
    assert writer.folder == str(tmp_path / "tensorboard") and writer.closed
    assert [s for s in writer.scalars if s[0] != "epoch/loss"] == expected  # NaN is null in JSON, NaN for the trackers
    assert [t for t, v, _ in writer.scalars if t == "epoch/loss" and v != v] == ["epoch/loss"]
    run = trackers.runs[0]
    assert run.settings["mode"] == "offline" and run.settings["dir"] == str(tmp_path) and run.settings["config"] == {"lr": 0.1}
    assert run.logged[0] == ({"eval/epoch": 0, "eval/recall_at_1": 0.5}, 0) and run.logged[1] == ({"step/loss": 2.5, "step/lr": 0.1}, 1)
    assert run.finished


def test_training_run_with_both_trackers(trackers, tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(4):
        for i in range(4):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    assert train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", "2", "--model", "smallcnn", "--epochs", "2",
                       "--batch-size", "4", "--image-size", "16", "--embedding-size", "8", "--workers", "0", "--loader", "torch",
                       "--no-progress", "--output", str(out), "--tensorboard", "--wandb"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    run = trackers.runs[0]
    assert run.settings["config"]["dataset"] == "folder" and run.settings["config"]["wandb"] is True
    steps = [step for _, step in run.logged]
    assert steps == sorted(steps) and len(run.logged) == len(records)  # W&B needs non-decreasing steps
    assert [values.get("epoch/recall@1") for values, _ in run.logged if "epoch/recall@1" in values] == \
        [r["recall@1"] for r in records if r["kind"] == "epoch"]
    assert {t for t, _, _ in _Writer.last.scalars} >= {"step/loss", "epoch/recall@1", "eval/map@r"}


def test_a_resumed_logger_drops_what_came_after_the_checkpoint(trackers, tmp_path):
    """Steps a killed run logged after its last checkpoint are cut from log.jsonl (a half-written
    last line too) and hidden in TensorBoard (purge_step), so a resumed run logs each step once."""
    logger = RunLogger(tmp_path, tensorboard=True)
    for step in range(1, 8):
        logger.log("step", step, loss=1.0)
    logger.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # killed mid-write
    RunLogger(tmp_path, tensorboard=True, resume_step=4).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert _Writer.last.purge_step == 5
    assert logs.truncate_log(tmp_path / "log.jsonl", 4) == 0
