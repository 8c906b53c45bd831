"""Tests of the ``python -m dmlfast.evaluate`` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dmlfast.evaluate import main


@pytest.fixture
def saved_arrays(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    embeddings = (rng.normal(size=(10, 8))[labels] + 0.3 * rng.normal(size=(60, 8))).astype(np.float32)
    np.save(tmp_path / "emb.npy", embeddings)
    np.save(tmp_path / "lab.npy", labels)
    np.save(tmp_path / "lab_short.npy", labels[:-1])
    return tmp_path


def test_prints_table_and_writes_json(saved_arrays, capsys):
    json_path = saved_arrays / "metrics.json"
    status = main(["--embeddings", str(saved_arrays / "emb.npy"), "--labels", str(saved_arrays / "lab.npy"),
                   "--ks", "1", "5", "--metrics", "recall", "map@r", "--json", str(json_path), "--no-progress"])
    assert status == 0
    written = json.loads(json_path.read_text())
    assert set(written) == {"recall@1", "recall@5", "map@r", "num_queries", "queries_without_match"}
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[2:])
    assert printed == {name: str(value) if isinstance(value, int) else f"{value:.4f}" for name, value in written.items()}


def test_json_is_never_replaced_unasked(saved_arrays, capsys):
    json_path = saved_arrays / "metrics.json"
    json_path.write_text("an earlier result\n")
    arguments = ["--embeddings", str(saved_arrays / "emb.npy"), "--labels", str(saved_arrays / "lab.npy"),
                 "--metrics", "recall", "--json", str(json_path), "--no-progress"]
    assert main(arguments) == 2
    assert f"--json: {json_path} exists; pass --overwrite" in capsys.readouterr().err
    assert json_path.read_text() == "an earlier result\n"
    assert main([*arguments, "--overwrite"]) == 0
    assert "recall@1" in json.loads(json_path.read_text())


def test_reference_mode(saved_arrays, capsys):
    emb, lab = str(saved_arrays / "emb.npy"), str(saved_arrays / "lab.npy")
    status = main(["--embeddings", emb, "--labels", lab, "--reference", emb, "--reference-labels", lab,
                   "--ks", "1", "--metrics", "recall"])
    assert status == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[2:])
    assert printed["recall@1"] == "1.0000"  # without self-exclusion each query finds itself

@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--embeddings", "missing.npy", "--labels", "lab.npy"], "--embeddings: no such file: missing.npy"),
        (["--embeddings", "emb.npy", "--labels", "lab_short.npy"], "embeddings has 60 rows, labels has 59"),
        (["--embeddings", "emb.npy", "--labels", "lab.npy", "--ks", "100"], "ks must not exceed"),
        (["--embeddings", "emb.npy", "--labels", "lab.npy", "--reference", "emb.npy"], "must be given together"),
    ],
)
def test_input_errors_are_one_line_with_status_2(saved_arrays, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(saved_arrays)
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and error.startswith("python -m dmlfast.evaluate: error:")


def test_module_entry_point_has_no_traceback(saved_arrays):
    completed = subprocess.run([sys.executable, "-m", "dmlfast.evaluate", "--embeddings", str(saved_arrays / "nope.npy"),
                                "--labels", str(saved_arrays / "lab.npy")], capture_output=True, text=True)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and "no such file" in completed.stderr
