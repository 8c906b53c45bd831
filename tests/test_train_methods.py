"""The methods of docs/losses.md §3–§6 in the training loop: Proxy-ISA, moving proxies, Proxy Synthesis,
IDML with mixup, and the binary evaluation column."""
import json
import zipfile

import pytest
import torch

from dmlfast import train
from test_train import OMNIGLOT, TINY, _write_tiny_omniglot

METHODS = {
    "ProxyISA": ["--loss", "ProxyISA", "--k", "0.4"],
    "Moving": ["--loss", "Moving", "--temperature", "0.05", "--momentum", "0.5"],
    "ProxyAnchor+PS": ["--loss", "ProxyAnchor", "--proxy-synthesis", "0.4,1.0"],
    "NormSoftmax+PS": ["--loss", "NormSoftmax", "--proxy-synthesis", "0.4,1.0"],
    "IDML": ["--loss", "IDML", "--mixup"],
    "IDML-raw-uncertainty": ["--loss", "IDML", "--uncertainty-l2-norm", "off", "--mixup", "off"],
    "ProxyAnchor+mixup": ["--loss", "ProxyAnchor", "--mixup"],
    "CosFace": ["--loss", "CosFace"],
    "ArcFace": ["--loss", "ArcFace"],
    "SubCenterArcFace": ["--loss", "SubCenterArcFace"],
    "SoftTriple": ["--loss", "SoftTriple"],
}
#: The recipes' class-center losses: K centers per class (docs/losses.md §9, §10).
CENTERS = {"CosFace": 1, "ArcFace": 1, "SubCenterArcFace": 3, "SoftTriple": 10}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return _write_tiny_omniglot(tmp_path_factory.mktemp("tiny_methods") / "omniglot")


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_on_a_generated_dataset(method, tiny_root, tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, *METHODS[method], "--data-root", str(tiny_root), "--output", str(out), "--lr", "0.01"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(h["loss"] is None or h["loss"] == h["loss"] for h in summary["history"])  # finite, no NaN
    state = torch.load(out / "last.pt", weights_only=False)
    config = json.loads((out / "config.json").read_text())
    if method == "ProxyISA":
        assert config["loss_kwargs"]["k"] == 0.4
        seen = 2 * (48 // 8) * 8  # 2 epochs x full batches of the 48 training images
        assert state["loss"]["counter"].sum().item() == seen  # no outlier filtering before epoch index 3
        assert int(state["loss"]["epoch"]) == 1
    if method == "Moving":
        assert "proxies" in state["loss"] and config["loss_kwargs"] == {"temperature": 0.05, "momentum": 0.5}
        assert not any(g["name"] == "proxies" for g in state["optimizer"]["param_groups"] if "name" in g)
    if method.endswith("+PS"):
        assert config["proxy_synthesis"] == [0.4, 1.0]
    if method.startswith("IDML"):
        raw = method == "IDML-raw-uncertainty"
        assert (config["mixup"], config["normalize_uncertainty"]) == (not raw, not raw)
        assert {"uncertainty.weight", "uncertainty.bias"} <= set(state["model"])
        backbone_group = next(g for g in state["optimizer"]["param_groups"] if g.get("name") == "backbone")
        assert len(backbone_group["params"]) == len(train.make_model(config).backbone_parameters())
    if method in CENTERS:
        assert state["loss"]["proxies"].shape[0] == 6 * CENTERS[method]  # the tiny set's 6 training classes
        assert config["loss_kwargs"].get("sub_centers", config["loss_kwargs"].get("centers_per_class", 1)) == CENTERS[method]
    if method == "ProxyAnchor+mixup":
        assert config["mixup"] and not any(k.startswith("uncertainty") for k in state["model"])


@pytest.mark.parametrize("loss, flags, loss_kwargs", [
    ("SubCenterArcFace", ["--margin", "20", "--scale", "30", "--centers", "2"],
     {"margin": 20.0, "scale": 30.0, "sub_centers": 2}),
    ("SoftTriple", ["--margin", "0.02", "--scale", "10", "--centers", "4"],
     {"centers_per_class": 4, "la": 10.0, "gamma": 0.1, "margin": 0.02, "tau": 0.2}),
    ("ProxyAnchor", ["--margin", "0.2", "--scale", "16"], {"margin": 0.2, "alpha": 16.0}),
])
def test_margin_scale_and_centers_flags(loss, flags, loss_kwargs, tiny_root, tmp_path):
    """--margin, --scale and --centers set the loss's own parameter (ArcFace's m, Proxy-Anchor's
    alpha, SoftTriple's lambda...), which the run uses and records."""
    out = tmp_path / "run"
    assert train.main([*TINY, "--loss", loss, *flags, "--epochs", "1", "--data-root", str(tiny_root),
                       "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["loss_kwargs"] == loss_kwargs
    centers = loss_kwargs.get("sub_centers", loss_kwargs.get("centers_per_class", 1))
    assert torch.load(out / "last.pt", weights_only=False)["loss"]["proxies"].shape[0] == 6 * centers


def test_binary_eval_reports_both_columns(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--binary-eval", "--data-root", str(tiny_root), "--output", str(out)]) == 0
    after = json.loads((out / "summary.json").read_text())["after"]
    assert {"recall@1", "binary_recall@1", "map@r", "binary_map@r"} <= set(after)
    assert "binary_recall@1" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--loss", "ProxyAnchor", "--k", "0.4"], "--k does not apply to --loss ProxyAnchor"),
    (["--loss", "ProxyISA", "--proxy-synthesis", "0.4,1.0"], "--proxy-synthesis wraps ProxyAnchor, ProxyNCA or NormSoftmax"),
    (["--loss", "Moving", "--momentum", "2"], "momentum must be in [0.0, 1.0]"),
    (["--loss", "ProxyISA", "--mixup"], "--mixup does not apply to --loss ProxyISA"),
    (["--loss", "ProxyAnchor", "--uncertainty-l2-norm", "off"], "--uncertainty-l2-norm does not apply to --loss ProxyAnchor"),
    (["--loss", "IDML", "--proxy-synthesis", "0.4,1.0"], "--proxy-synthesis wraps ProxyAnchor, ProxyNCA or NormSoftmax"),
    (["--loss", "ArcFace", "--centers", "2"], "--centers does not apply to --loss ArcFace (it does to SubCenterArcFace, SoftTriple)"),
    (["--loss", "ProxyNCA", "--margin", "0.1"], "--margin does not apply to --loss ProxyNCA (it does to ProxyAnchor, "),
    (["--loss", "SoftTriple", "--scale", "0"], "--scale must be a positive number, got 0.0"),
    (["--loss", "SoftTriple", "--centers", "0"], "--centers must be at least 1, got 0"),
    (["--loss", "CosFace", "--margin", "inf"], "--margin must be a finite number, got inf"),
    (["--loss", "ArcFace", "--margin", "180"], "ArcFaceLoss: margin must be in [0.0, 180.0), got 180.0"),
])
def test_method_flag_errors(extra, message, tiny_root, tmp_path, capsys):
    assert train.main([*TINY, *extra, "--data-root", str(tiny_root), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and message in err


def test_proxy_synthesis_flag_format(capsys):
    with pytest.raises(SystemExit) as stop:
        train.build_parser().parse_args(["--proxy-synthesis", "0.4"])
    assert stop.value.code == 2 and "expected ALPHA,MU" in capsys.readouterr().err


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"real Omniglot zips not found at {OMNIGLOT}")
@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_unseen_omniglot_characters(method, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "omniglot_real"
    if not root.is_dir():
        for z in sorted(OMNIGLOT.glob("images_background_small*.zip")):
            with zipfile.ZipFile(z) as f:
                f.extractall(root)
    out = tmp_path_factory.mktemp(method.replace("+", "_"))
    assert train.main(["--dataset", "Omniglot", "--data-root", str(root), "--output", str(out / "run"), "--epochs", "1",
                       "--loader", "torch", "--workers", "0", "--no-progress", *METHODS[method]]) == 0
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["after"]["recall@1"] >= summary["before"]["recall@1"] + 0.10
