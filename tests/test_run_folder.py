"""The run's output folder: one run at a time, no earlier result replaced unasked, and a crash,
a full disk or a diverging run ending in one ``error:`` line with the last checkpoint intact.

Runs use the tiny generated Omniglot set of ``test_train.py``; the lock test starts real processes
(a second run against a live one, then ``--resume`` after the first was killed with SIGKILL).
"""
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dmlfast import train
from test_train import REPO, TINY, _runner, _write_tiny_omniglot


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return _write_tiny_omniglot(tmp_path_factory.mktemp("tiny") / "omniglot")


def _args(root, out, *extra):
    return [*TINY, "--data-root", str(root), "--output", str(out), "--epochs", "1", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{train.PROG}: error: "), err
    return err[0]


def _steps(out: Path):
    return [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_a_new_run_never_replaces_an_earlier_best_pt(tiny_root, tmp_path, capsys):
    """After ``rm last.pt`` (the obvious answer to a corrupt last.pt) a new run used to start afresh and
    overwrite the trained best.pt with the epoch-0 model."""
    out = tmp_path / "run"
    assert train.main(_args(tiny_root, out, "--lr", "0.01")) == 0
    (out / "last.pt").unlink()
    trained = (out / "best.pt").read_bytes()
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert train.main(_args(tiny_root, out, "--lr", "0.01", *extra)) == 2
        line = _error_line(capsys)
        assert "best.pt" in line and "log.jsonl" in line and "--overwrite" in line, line
        assert (out / "best.pt").read_bytes() == trained
    assert train.main(_args(tiny_root, out, "--lr", "0.01", "--overwrite", "--resume")) == 2
    assert "--overwrite and --resume" in _error_line(capsys)
    assert train.main(_args(tiny_root, out, "--lr", "0.01", "--overwrite")) == 0  # asked for: replaced
    assert (out / "best.pt").read_bytes() != trained and (out / "last.pt").is_file()
    assert _steps(out) == list(range(1, 7))  # the new run's log alone, not appended to the old one


def test_output_that_is_a_file_is_one_line(tiny_root, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert train.main(_args(tiny_root, tmp_path / "taken")) == 2
    assert "--output " in (line := _error_line(capsys)) and "is a file, not a folder" in line


def test_a_second_run_on_a_live_output_is_refused_and_a_killed_run_resumes(tiny_root, tmp_path):
    """Two runs on one --output (or --resume during a live run) both used to run, one's checkpoints
    lost and log.jsonl interleaved. The second is one line naming the live run; once that run is
    killed (SIGKILL: its lock dies with it), --resume continues it, removes the temporary file of
    the interrupted checkpoint write, and log.jsonl holds each step once."""
    args = [*TINY, "--data-root", str(tiny_root), "--epochs", "3", "--batch-size", "2", "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, out = tmp_path / "full", tmp_path / "run"
    subprocess.run(_runner([*args, "--output", str(full)]), check=True, cwd=REPO, env=env, capture_output=True)

    first = subprocess.Popen(_runner([*args, "--output", str(out)]), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:  # stop it in epoch 2, after some of its steps
        if log.is_file() and sum('"epoch": 2' in line and '"kind": "step"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before it could be stopped"
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(_runner([*args, "--output", str(out)]), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{train.PROG}: error: --output "), second.stderr
        assert "in use by another run" in lines[0] and f"pid {first.pid}" in lines[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] in (1, 2)
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves it
    assert max(_steps(out)) > torch.load(out / "last.pt", weights_only=True)["epoch"] * 24  # steps past the checkpoint
    resumed = subprocess.run(_runner([*args, "--output", str(out)]), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(out.glob(".*.tmp"))
    assert _steps(out) == _steps(full) == list(range(1, 3 * 24 + 1))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, out))
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tiny_root, tmp_path, monkeypatch, capsys):
    import dmlfast.training.checkpoint as checkpoint

    real_save = torch.save

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_the_disk)
    out = tmp_path / "run"
    assert train.main(_args(tiny_root, out, "--epochs", "3")) == 2
    line = _error_line(capsys)
    assert "cannot write checkpoint" in line and "No space left on device" in line and "is intact" in line, line
    assert "--resume" in line
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


def test_divergence_is_one_line_naming_the_step_and_the_fix(tiny_root, tmp_path, capsys):
    assert train.main(_args(tiny_root, tmp_path / "run", "--lr", "1e12", "--epochs", "2")) == 2
    line = _error_line(capsys)
    assert "the loss became NaN/Inf at step" in line and "lower --lr" in line and "--grad-clip" in line, line


def test_resume_truncates_the_log_to_the_checkpoint_and_removes_stale_temporaries(tiny_root, tmp_path, monkeypatch):
    """A run stopped after epoch 2's steps were logged but before its checkpoint: log.jsonl used to
    repeat those steps after --resume, and the temporary file of the interrupted write stayed."""
    import dmlfast.training.loop as loop

    full, out = tmp_path / "full", tmp_path / "run"
    assert train.main(_args(tiny_root, full, "--epochs", "2")) == 0
    real_save = loop.save_checkpoints

    def stop_at_epoch_2(run, epoch, *paths):
        if epoch == 2:
            (run.out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt  # as a kill during the write
        real_save(run, epoch, *paths)

    monkeypatch.setattr(loop, "save_checkpoints", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(tiny_root, out, "--epochs", "2"))
    monkeypatch.setattr(loop, "save_checkpoints", real_save)
    assert _steps(out) == list(range(1, 13))  # epoch 2's steps are logged, last.pt holds epoch 1
    assert train.main(_args(tiny_root, out, "--epochs", "2", "--resume")) == 0
    assert _steps(out) == _steps(full) == list(range(1, 13))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert not list(out.glob(".*.tmp"))
