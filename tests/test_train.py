"""End-to-end tests of ``python -m dmlfast.train`` (and ``python -m dmlfast.evaluate --checkpoint``).

Runs use a tiny generated Omniglot-layout dataset (12 characters x 8 drawings, 16 px), the torch
loader in the main process, and a few iterations; one test runs the real glyph default for one epoch
and one a short run on the real Omniglot small sets when ``../shared/data/omniglot`` exists.
"""
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlfast import evaluate, train
from dmlfast.data import dali_available
from dmlfast.recipes import resolve_recipe

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
TINY = ["--dataset", "Omniglot", "--epochs", "2", "--batch-size", "8", "--image-size", "16", "--embedding-size", "16",
        "--workers", "0", "--loader", "torch", "--no-progress"]


def _write_tiny_omniglot(root: Path, classes_per_split: int = 6, per_class: int = 8) -> Path:
    """Omniglot layout; each character is a random 8x8 binary pattern, its drawings noisy shifted copies."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("images_background", "images_evaluation"):
        for c in range(classes_per_split):
            folder = root / split / f"Alphabet_{split[-4:]}" / f"character{c:02d}"
            folder.mkdir(parents=True)
            pattern = np.kron(rng.random((8, 8)) > 0.5, np.ones((3, 3)))
            for i in range(per_class):
                canvas = np.zeros((28, 28))
                dy, dx = rng.integers(0, 5, size=2)
                canvas[dy:dy + 24, dx:dx + 24] = pattern
                noisy = np.clip(canvas + rng.normal(0, 0.15, canvas.shape), 0, 1)
                Image.fromarray((255 * (1 - noisy)).astype(np.uint8)).save(folder / f"{c:02d}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return _write_tiny_omniglot(tmp_path_factory.mktemp("tiny") / "omniglot")


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    """One finished 2-epoch run on the tiny set: (output folder, summary)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(out), "--lr", "0.01"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_end_to_end_writes_everything(tiny_run):
    out, summary = tiny_run
    for name in ("config.json", "last.pt", "best.pt", "log.jsonl", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2 * (48 // 8)  # 6 train characters x 8 drawings, batch 8, drop_last
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert 0.0 <= summary["after"][key] <= 1.0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_end_to_end_with_dali(tiny_root, tmp_path):
    out = tmp_path / "dali"
    args = [a if a != "torch" else "dali" for a in TINY]
    assert train.main([*args, "--data-root", str(tiny_root), "--output", str(out), "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["loader"] == "dali"
    assert np.isfinite(json.loads((out / "summary.json").read_text())["history"][1]["loss"])


def test_config_file_records_overrides_over_the_recipe(tiny_run):
    out, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    recipe = resolve_recipe("Omniglot", "ProxyAnchor")
    assert config["lr"] == 0.01 != recipe.lr
    assert config["batch_size"] == 8 and config["embedding_size"] == 16 and config["image_size"] == 16
    assert config["lr_step"] == recipe.lr_step and config["proxy_lr_mult"] == recipe.proxy_lr_mult == 100.0
    assert torch.load(out / "last.pt", weights_only=False)["config"] == config


def test_recipe_table_and_override_precedence(tmp_path):
    parse = train.build_parser().parse_args
    root = ["--data-root", str(tmp_path)]
    cub_r50 = train.make_config(parse(["--dataset", "CUB", *root, "--model", "resnet50"]))
    assert (cub_r50["batch_size"], cub_r50["warmup_epochs"], cub_r50["lr_step"], cub_r50["lr"]) == (120, 5, 5, 1e-4)
    assert cub_r50["proxy_lr_mult"] == 100 and cub_r50["grad_clip"] == 10 and cub_r50["freeze_bn"] is True
    sop = train.make_config(parse(["--dataset", "SOP", *root]))
    assert (sop["model"], sop["lr"], sop["lr_step"], sop["lr_gamma"], sop["freeze_bn"], sop["batch_size"]) == ("bn_inception", 6e-4, 20, 0.25, False, 180)
    assert sop["ks"] == [1, 10, 100, 1000]
    cars = train.make_config(parse(["--dataset", "Cars196", *root]))
    assert cars["lr_step"] == 20 and cars["warmup_epochs"] == 1
    overridden = train.make_config(parse(["--dataset", "SOP", *root, "--lr", "0.1", "--lr-step", "3", "--freeze-bn", "on",
                                          "--batch-size", "60", "--samples-per-class", "3"]))
    assert (overridden["lr"], overridden["lr_step"], overridden["freeze_bn"], overridden["batch_size"], overridden["samples_per_class"]) == (0.1, 3, True, 60, 3)
    assert overridden["lr_gamma"] == 0.25  # not given: still the recipe's
    nca = train.make_config(parse(["--dataset", "CUB", *root, "--loss", "ProxyNCA"]))
    assert (nca["model"], nca["embedding_size"], nca["pooling"], nca["layer_norm"], nca["optimizer"], nca["adam_eps"]) == ("resnet50", 2048, "max", True, "adam", 1.0)
    assert (nca["proxy_lr_mult"], nca["batch_size"], nca["samples_per_class"], nca["loss_kwargs"]) == (1e5, 32, 4, {"scale": 18.0})
    assert train.make_config(parse(["--dataset", "SOP", *root, "--loss", "ProxyNCA"]))["proxy_lr_mult"] == 1e4
    ns = train.make_config(parse(["--dataset", "Cars196", *root, "--loss", "NormSoftmax"]))
    assert (ns["adam_eps"], ns["lr_step"], ns["lr_gamma"], ns["epochs"], ns["pooling"], ns["loss_kwargs"]) == (0.01, 50, 0.1, 130, "avg", {"scale": 23.0})
    glyphs = train.make_config(parse([]))
    assert (glyphs["dataset"], glyphs["model"], glyphs["weights"], glyphs["loss"]) == ("glyphs", "smallcnn", "none", "ProxyAnchor")


def test_checkpoint_evaluate_round_trip(tiny_run, tiny_root, tmp_path, capsys):
    out, summary = tiny_run
    json_path = tmp_path / "metrics.json"
    status = evaluate.main(["--checkpoint", str(out / "best.pt"), "--data-root", str(tiny_root), "--loader", "torch",
                            "--workers", "0", "--no-progress", "--json", str(json_path)])
    assert status == 0
    metrics = json.loads(json_path.read_text())
    best_epoch = summary["best"]["epoch"]
    assert metrics["recall@1"] == pytest.approx(summary["history"][best_epoch]["recall@1"], abs=1e-9)
    assert metrics["map@r"] == pytest.approx(summary["history"][best_epoch]["map@r"], abs=1e-6)
    assert "recall@8" in capsys.readouterr().out


def test_checkpoint_evaluate_honours_metrics(tiny_run, tiny_root, tmp_path):
    out, summary = tiny_run
    common = ["--checkpoint", str(out / "best.pt"), "--data-root", str(tiny_root), "--loader", "torch", "--workers", "0",
              "--no-progress", "--ks", "1", "2"]
    assert evaluate.main([*common, "--metrics", "nmi", "--json", str(tmp_path / "nmi.json")]) == 0
    nmi = json.loads((tmp_path / "nmi.json").read_text())
    assert set(nmi) == {"nmi"} and 0.0 <= nmi["nmi"] <= 1.0
    assert evaluate.main([*common, "--metrics", "recall", "--binary", "--json", str(tmp_path / "binary.json")]) == 0
    binary = json.loads((tmp_path / "binary.json").read_text())
    assert set(binary) == {"recall@1", "recall@2"} and 0.0 <= binary["recall@1"] <= binary["recall@2"] <= 1.0


def test_amp_bf16_on_cpu_runs(tiny_root, tmp_path):
    out = tmp_path / "bf16"
    assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(out), "--epochs", "1", "--amp", "bf16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["history"][1]["loss"])
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["loss"]["proxies"].dtype == torch.float32


def test_warmup_trains_only_embedding_and_proxies_then_everything(tiny_root, tmp_path):
    def conv_weights(out):
        state = torch.load(out / "last.pt", weights_only=False, map_location="cpu")["model"]
        return {k: v for k, v in state.items() if k.startswith("backbone.") and v.dim() == 4}

    torch.manual_seed(1)  # the run's --seed default, used before the model is built
    model = train.make_model({**resolve_recipe("Omniglot", "ProxyAnchor").to_dict(), "embedding_size": 16})
    initial = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items() if v.dim() == 4}
    for epochs, expect_changed in ((1, False), (2, True)):
        out = tmp_path / f"warm{epochs}"
        assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(out), "--epochs", str(epochs),
                           "--warmup-epochs", "1", "--eval-every", "5"]) == 0
        weights = conv_weights(out)
        assert weights.keys() == initial.keys()
        changed = [k for k, v in weights.items() if not torch.equal(v, initial[k])]
        assert changed == (list(initial) if expect_changed else []), changed


def _runner(args):
    code = ("import sys, torch; torch.set_num_threads(1); from dmlfast.train import main; "
            f"sys.exit(main({args!r}))")
    return [sys.executable, "-c", code]


def test_resume_after_kill_matches_uninterrupted_run(tiny_root, tmp_path):
    args = [*TINY, "--data-root", str(tiny_root), "--epochs", "3", "--batch-size", "2", "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_runner([*args, "--output", str(full)]), check=True, cwd=REPO, env=env, capture_output=True)

    proc = subprocess.Popen(_runner([*args, "--output", str(killed)]), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # kill in epoch 2, after some of its steps
        if log.is_file() and sum('"epoch": 2' in line and '"kind": "step"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "last.pt", weights_only=False)["epoch"] in (1, 2)  # 1 unless epoch 2 ended before the kill
    subprocess.run(_runner([*args, "--output", str(killed)]), check=True, cwd=REPO, env=env, capture_output=True)

    # the checkpoints hold only tensors and plain data (they load with weights_only=True), and the
    # resumed run ends bit for bit where the uninterrupted one does, RNG states included
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, killed))
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), f"{part}.{key}"
    assert a["rng"].keys() == b["rng"].keys() == {"python", "numpy", "torch"}
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["rng"]["python"]["state"], b["rng"]["python"]["state"])
    assert torch.equal(a["rng"]["numpy"]["key"], b["rng"]["numpy"]["key"]) and a["rng"]["numpy"]["pos"] == b["rng"]["numpy"]["pos"]
    assert [h["recall@1"] for h in a["history"]] == [h["recall@1"] for h in b["history"]]


def test_glyph_default_first_epoch_learns(tmp_path):
    out = tmp_path / "glyphs"
    assert train.main(["--output", str(out), "--epochs", "1", "--workers", "0", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["model"], config["image_size"], config["loss"]) == ("glyphs", "smallcnn", None, "ProxyAnchor")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["recall@1"] > summary["before"]["recall@1"] + 0.03


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"real Omniglot zips not found at {OMNIGLOT}")
def test_real_omniglot_learns_on_unseen_characters(tmp_path):
    root = tmp_path / "omniglot"
    zips = sorted(OMNIGLOT.glob("images_background_small*.zip"))
    if not zips:
        pytest.skip(f"no images_background_small*.zip in {OMNIGLOT}")
    for z in zips:
        with zipfile.ZipFile(z) as f:
            f.extractall(root)
    out = tmp_path / "run"
    assert train.main(["--dataset", "Omniglot", "--data-root", str(root), "--output", str(out), "--epochs", "1",
                       "--loader", "torch", "--workers", "0", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["recall@1"] >= summary["before"]["recall@1"] + 0.10


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m dmlfast.train: error: ")
    return err


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "CUB"], "needs --data-root"),
    (["--dataset", "CUB", "--data-root", "/nonexistent/cub"], "no such folder"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA" if not torch.cuda.is_available() else "visible"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--samples-per-class", "3", "--batch-size", "8"], "divide --batch-size"),
    (["--model", "resnet18", "--weights", "/nonexistent/w.pth"], "no such file"),
    (["--model", "bn_inception", "--weights", "imagenet"], "not in torchvision"),
])
def test_user_errors_are_one_line_with_status_2(extra, message, tmp_path, capsys):
    assert train.main([*extra, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in _one_error_line(capsys)


def test_wrong_layout_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--dataset", "CUB", "--data-root", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "--data-root" in _one_error_line(capsys)


def test_dali_asked_but_missing(monkeypatch, tiny_root, tmp_path, capsys):
    import dmlfast.data

    monkeypatch.setattr(dmlfast.data, "dali_available", lambda: False)
    assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(tmp_path / "o"), "--loader", "dali"]) == 2
    assert "DALI is not installed" in _one_error_line(capsys)


def test_resume_from_another_config_is_refused(tiny_run, tiny_root, capsys):
    out, _ = tiny_run
    assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(out), "--resume", "--lr", "0.5"]) == 2
    err = _one_error_line(capsys)
    assert "another configuration" in err and "lr" in err


def test_existing_run_needs_resume(tiny_run, tiny_root, capsys):
    out, _ = tiny_run
    assert train.main([*TINY, "--data-root", str(tiny_root), "--output", str(out), "--lr", "0.01"]) == 2
    assert "--resume" in _one_error_line(capsys)


def test_unknown_names_exit_2(capsys):
    for flag, value, suggestion in (("--dataset", "MNIST", ""), ("--model", "resnet5", "; did you mean resnet50?"),
                                     ("--loss", "ProxyAnchr", "; did you mean ProxyAnchor?")):
        with pytest.raises(SystemExit) as exit_info:
            train.main([flag, value])
        assert exit_info.value.code == 2
        what = flag[2:]
        err = capsys.readouterr().err
        assert err.startswith(f"python -m dmlfast.train: error: argument {flag}: unknown {what} {value!r}{suggestion} (choose one of ")
        assert err.count("\n") == 1 and "usage:" not in err


def test_names_are_taken_in_any_case():
    args = train.build_parser().parse_args(["--loss", "proxynca", "--model", "ResNet18", "--dataset", "cub"])
    assert (args.loss, args.model, args.dataset) == ("ProxyNCA", "resnet18", "CUB")


def test_a_mistyped_name_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--loss", "proxyanchr"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("python -m dmlfast.train: error: argument --loss: unknown loss 'proxyanchr'; did you mean ProxyAnchor? "
                          "(choose one of ProxyAnchor, ProxyNCA, NormSoftmax, ProxyISA, Moving, IDML, ")


def test_an_unknown_model_names_timm_too(capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "vgg16"])
    assert "unknown model 'vgg16' (choose one of " in capsys.readouterr().err.replace("\n", " ")
    assert train.build_parser().parse_args(["--model", "timm:Some_Model"]).model == "timm:Some_Model"  # timm's names as given


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dmlfast.train", "--dataset", "SOP", "--output", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "python -m dmlfast.train: error: --dataset SOP needs --data-root DIR, the folder holding it"


def test_help_documents_the_recipes():
    text = train.build_parser().format_help()
    for word in ("--dataset", "--loss", "--model", "--amp", "--resume", "--weights", "ProxyAnchor", "Cadene", "IMAGENET1K_V1"):
        assert word in text
