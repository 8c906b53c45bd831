"""Nothing loaded from a file runs code: a checkpoint whose pickle calls a function (here one that
writes a marker file) is refused, unread, by every command that loads one, with one ``error:`` line.

The entry points: ``evaluate --checkpoint``, ``retrieve --checkpoint``, ``plot --checkpoint``,
``train --resume`` (its last.pt), the proxy shard files of ``--shard-proxies`` and ``train --weights``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_tiny_folder_run
from dmlfast import evaluate, plot, retrieve, train
from dmlfast.training import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


class MarkerPayload:
    """Unpickled freely, this calls ``exec`` with code that writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class ShellPayload:
    """Unpickled freely, this runs ``touch marker`` through ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant(real: Path, target: Path, payload) -> Path:
    """Write ``target``: the checkpoint ``real`` with its model state replaced by ``payload``
    (every other entry as a real checkpoint has it, so only the payload can make it fail)."""
    state = torch.load(real, map_location="cpu", weights_only=False)  # the test's own run
    state["model"] = {"weight": payload}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data root, best.pt) of a 1-epoch smallcnn run on a 4 + 4 class folder dataset."""
    return train_tiny_folder_run(tmp_path_factory.mktemp("security"), seed=0, test_classes="0.5")


def _one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("payload", [MarkerPayload, ShellPayload])
def test_load_torch_file_refuses_objects_without_creating_them(tmp_path, payload):
    from dmlfast.safe_load import UnsafeFileError, load_torch_file

    marker = tmp_path / "marker"
    torch.save({"model": payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="refusing to load checkpoint .*evil.pt: it holds a Python object"):
        load_torch_file(tmp_path / "evil.pt", "checkpoint")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_evaluate_refuses_a_malicious_checkpoint(tiny, tmp_path, capsys):
    root, best = tiny
    marker = tmp_path / "marker"
    evil = plant(best, tmp_path / "evil.pt", MarkerPayload(marker))
    status = evaluate.main(["--checkpoint", str(evil), "--data-root", str(root), "--workers", "0", "--no-progress"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert status == 2
    line = _one_error_line(capsys.readouterr().err, evaluate.PROG)
    assert "refusing to load checkpoint" in line and "(exec)" in line


def test_retrieve_refuses_a_malicious_checkpoint(tiny, tmp_path, capsys):
    root, best = tiny
    marker = tmp_path / "marker"
    evil = plant(best, tmp_path / "evil.pt", MarkerPayload(marker))
    status = retrieve.main(["--checkpoint", str(evil), "--query", str(root / "class_0" / "0.png"), "--gallery", str(root),
                            "--out", str(tmp_path / "grid.png"), "--workers", "0", "--no-progress"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert status == 2 and not (tmp_path / "grid.png").exists()
    assert "refusing to load checkpoint" in _one_error_line(capsys.readouterr().err, retrieve.PROG)


def test_plot_refuses_a_malicious_checkpoint(tiny, tmp_path, capsys):
    _, best = tiny
    marker = tmp_path / "marker"
    evil = plant(best, tmp_path / "evil.pt", MarkerPayload(marker))
    status = plot.main(["--checkpoint", str(evil), "--out", str(tmp_path / "map.png"), "--workers", "0", "--no-progress"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert status == 2
    assert "refusing to load checkpoint" in _one_error_line(capsys.readouterr().err, plot.PROG)


def test_resume_refuses_a_malicious_last_pt(tiny, tmp_path, capsys):
    root, best = tiny
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    plant(best, out / "last.pt", ShellPayload(marker))
    status = train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", "0.5", "--model", "smallcnn",
                         "--epochs", "2", "--batch-size", "8", "--image-size", "16", "--embedding-size", "16", "--workers", "0",
                         "--loader", "torch", "--no-progress", "--output", str(out), "--resume"])
    assert not marker.exists(), "the checkpoint's code ran"
    assert status == 2
    line = _one_error_line(capsys.readouterr().err, train.PROG)
    assert "--resume: refusing to load checkpoint" in line and "posix.system" in line


def test_weights_refuses_a_malicious_state_dict(tiny, tmp_path, capsys):
    root, _ = tiny
    marker = tmp_path / "marker"
    torch.save({"conv1.weight": MarkerPayload(marker)}, tmp_path / "weights.pth")
    status = train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", "0.5", "--model", "smallcnn",
                         "--weights", str(tmp_path / "weights.pth"), "--epochs", "1", "--workers", "0", "--no-progress",
                         "--output", str(tmp_path / "run")])
    assert not marker.exists(), "the file's code ran"
    assert status == 2
    line = _one_error_line(capsys.readouterr().err, train.PROG)
    assert "--weights: refusing to load state dict" in line and "(exec)" in line


def test_resume_refuses_a_malicious_proxy_shard(tmp_path):
    """Two gloo processes with --shard-proxies: rank 1's shard file is replaced; rank 1 refuses it."""
    from conftest import write_colour_block_classes
    from test_train_distributed import COMMON, torchrun

    root = write_colour_block_classes(tmp_path / "data", classes=8, per_class=6, seed=3)
    out = tmp_path / "run"
    args = [*COMMON, "--data-root", root, "--shard-proxies", "--output", out, "--resume"]
    first = torchrun([*args, "--epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    for path in (out / "last.pt", out / "last.shard-1-of-2.pt"):  # now part of a 2-epoch run
        state = load_checkpoint(path)
        state["config"]["epochs"] = 2
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    marker = tmp_path / "marker"
    shard = torch.load(out / "last.shard-1-of-2.pt", weights_only=False)  # the test's own run
    shard["loss"] = {"proxies": MarkerPayload(marker)}
    torch.save(shard, out / "last.shard-1-of-2.pt")
    result = torchrun([*args, "--epochs", "2"])
    assert not marker.exists(), "the shard's code ran"
    assert result.returncode != 0
    assert "(rank 1): error: --resume: refusing to load checkpoint" in result.stderr and "(exec)" in result.stderr


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """Format 1 kept numpy's RNG state as a numpy array (and Python's as a tuple): still readable, safely."""
    import random

    import numpy as np

    from dmlfast.training import set_rng_state

    legacy = {"format": 1, "config": {"seed": 1}, "epoch": 1, "model": {"w": torch.ones(2)},
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(legacy, tmp_path / "old.pt")
    state = load_checkpoint(tmp_path / "old.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_checkpoint_refuses_what_a_safe_load_could_not_read(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a ndarray"):
        save_checkpoint({"config": {}, "rng": {"numpy": np.zeros(3)}}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_not_a_checkpoint_is_one_line_in_a_fresh_process(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage" * 10)
    result = subprocess.run([sys.executable, "-m", "dmlfast.evaluate", "--checkpoint", str(tmp_path / "x.pt")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    line = _one_error_line(result.stderr, evaluate.PROG)
    assert "cannot read checkpoint" in line and "weights_only" not in line


def test_a_checkpoint_without_a_model_entry_is_one_line(tiny, tmp_path, capsys):
    """A proxy shard (or any checkpoint lacking 'model') given to evaluate, retrieve or plot used to
    end in a KeyError traceback."""
    root, best = tiny
    state = load_checkpoint(best)
    shard = save_checkpoint({"config": state["config"], "epoch": state["epoch"], "loss": state["loss"],
                             "optimizer": state["optimizer"]}, tmp_path / "best.shard-0-of-2.pt")
    commands = {
        evaluate: ["--checkpoint", str(shard), "--data-root", str(root), "--workers", "0", "--no-progress"],
        retrieve: ["--checkpoint", str(shard), "--query", str(root / "class_0" / "0.png"), "--gallery", str(root),
                   "--out", str(tmp_path / "grid.png"), "--workers", "0", "--no-progress"],
        plot: ["--checkpoint", str(shard), "--out", str(tmp_path / "map.png"), "--workers", "0", "--no-progress"],
    }
    for command, args in commands.items():
        assert command.main(args) == 2
        line = _one_error_line(capsys.readouterr().err, command.PROG)
        assert "has no 'model' entry" in line and "best.shard-0-of-2.pt" in line, line


@pytest.mark.parametrize("command", ["load", "embed", "export", "index"])
def test_the_serving_entry_points_refuse_a_malicious_checkpoint(tiny, tmp_path, capsys, command):
    import dmlfast
    from dmlfast import embed as embed_command
    from dmlfast import export as export_command
    from dmlfast import index as index_command
    from dmlfast.checks import InputError

    root, best = tiny
    marker = tmp_path / "marker"
    evil = str(plant(best, tmp_path / "evil.pt", MarkerPayload(marker)))
    if command == "load":
        with pytest.raises(InputError, match=r"refusing to load checkpoint .*\(exec\)"):
            dmlfast.load(evil, device="cpu")
    else:
        module, argv = {"embed": (embed_command, ["--checkpoint", evil, "--images", str(root), "--out", str(tmp_path / "e.npy")]),
                        "export": (export_command, ["--checkpoint", evil, "--format", "torchscript", "--out", str(tmp_path / "m.pt")]),
                        "index": (index_command, ["build", "--checkpoint", evil, "--gallery", str(root), "--out", str(tmp_path / "g")])}[command]
        assert module.main(argv + (["--workers", "0"] if command != "export" else [])) == 2
        assert "refusing to load checkpoint" in _one_error_line(capsys.readouterr().err, module.PROG)
    assert not marker.exists(), "the checkpoint's code ran"
    assert not any(tmp_path.glob("e*.npy")) and not (tmp_path / "m.pt").exists() and not (tmp_path / "g").exists()
