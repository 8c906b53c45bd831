"""Data-parallel training under torchrun (``dmlfast.training.distributed`` and its use in ``dmlfast.train``).

Real 2-process runs on the CPU (gloo): ``torch.distributed.run`` launching ``-m dmlfast.train`` on a
tiny generated class-folder set, and two gloo processes spawned with ``torch.multiprocessing``
that drive the helpers directly (gathered evaluation, DDP gradients across the warm-up rebuild and
mixup's second forward, moving proxies, replicas equal after training).
"""
import copy
import gc
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import dmlfast
from conftest import spawn_gloo_ranks, write_colour_block_classes
from dmlfast import train
from dmlfast.training import distributed

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "folder", "--test-classes", "4", "--model", "smallcnn", "--image-size", "16", "--embedding-size", "16",
          "--workers", "0", "--loader", "torch", "--no-progress", "--batch-size", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS}
    return dict(env, OMP_NUM_THREADS="1")


def torchrun(args, nproc: int = 2, log_dir: Path = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m dmlfast.train args`` from the repository root; with
    ``log_dir`` each rank's stdout/stderr go to ``log_dir/<run>/attempt_0/<rank>/std{out,err}.log``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port())]
    if log_dir is not None:
        command += ["--log-dir", str(log_dir), "--redirects", "3"]
    return subprocess.run([*command, "-m", "dmlfast.train", *[str(a) for a in args]], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def single(args) -> subprocess.CompletedProcess:
    """``python -m dmlfast.train args`` in a fresh process, as a reference for the torchrun runs."""
    return subprocess.run([sys.executable, "-m", "dmlfast.train", *[str(a) for a in args]], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """8 colour-block classes x 6 images: 4 training classes (24 images), 4 held out; noisy enough
    that the untrained model's metrics are far from 1 (Recall@1 0.54, MAP@R 0.38)."""
    return write_colour_block_classes(tmp_path_factory.mktemp("ddp") / "data", classes=8, per_class=6, seed=3, noise=140)


@pytest.fixture(scope="module")
def ddp_run(data_root, tmp_path_factory):
    """A finished 2-process run: 2 epochs, the first a warm-up, with mixup; (output folder, rank log folder)."""
    base = tmp_path_factory.mktemp("ddp_run")
    out, logs = base / "run", base / "logs"
    _ok(torchrun([*COMMON, "--data-root", data_root, "--epochs", "2", "--warmup-epochs", "1", "--mixup", "--output", out],
                 log_dir=logs))
    return out, logs


def _rank_logs(logs: Path, rank: int, stream: str) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def test_two_process_run_writes_once_and_only_rank_0_talks(ddp_run):
    out, logs = ddp_run
    for name in ("config.json", "last.pt", "best.pt", "log.jsonl", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "a checkpoint write was left half done"
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["mixup"] is True and config["warmup_epochs"] == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 24 training images, global batch 2 x 4: 3 steps per epoch, each logged once (by rank 0)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    stdout0 = _rank_logs(logs, 0, "stdout")
    assert stdout0.count("best Recall@1") == 1 and "global batch 2 x 4 = 8" in stdout0
    assert _rank_logs(logs, 1, "stdout") == "" and _rank_logs(logs, 1, "stderr") == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["map@r"] > summary["before"]["map@r"]  # it learned
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and state["config"] == config
    assert not any(k.startswith("module.") for k in (*state["model"], *state["loss"]))


def test_checkpoint_of_a_torchrun_run_evaluates_with_the_single_process_cli(ddp_run):
    out, _ = ddp_run
    result = subprocess.run([sys.executable, "-m", "dmlfast.evaluate", "--checkpoint", str(out / "best.pt"), "--no-progress"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recall@1" in result.stdout.lower()


def test_gathered_evaluation_before_training_equals_single_process(data_root, tmp_path):
    args = [*COMMON, "--data-root", data_root, "--epochs", "1", "--binary-eval"]
    _ok(torchrun([*args, "--output", tmp_path / "two"]))
    _ok(single([*args, "--output", tmp_path / "one"]))
    two, one = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("two", "one"))
    assert set(two["before"]) == set(one["before"]) and "recall@1" in one["before"]
    assert two["before"] == one["before"]  # same seed, same initial model: the same metrics, exactly


def test_resume_with_the_same_world_size_matches_an_uninterrupted_run(data_root, tmp_path):
    args = [*COMMON, "--data-root", data_root, "--resume"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _ok(torchrun([*args, "--epochs", "2", "--output", full]))
    # A run killed after its first epoch: a 1-epoch run's last.pt, relabelled as part of a 2-epoch run
    # (the smallcnn recipe's StepLR does not depend on the epoch count, so its state is the same).
    _ok(torchrun([*args, "--epochs", "1", "--output", cut]))
    state = torch.load(cut / "last.pt", weights_only=False)
    state["config"]["epochs"] = 2
    dmlfast.training.save_checkpoint({k: v for k, v in state.items() if k != "format"}, cut / "last.pt")
    resumed = _ok(torchrun([*args, "--epochs", "2", "--output", cut]))
    assert resumed.stdout.count("resumed from") == 1
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (full, cut))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "loss"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-6, msg=f"{part}.{key}")
    assert [h.get("recall@1") for h in a["history"]] == pytest.approx([h.get("recall@1") for h in b["history"]])


def test_resume_with_another_world_size_is_refused(ddp_run, tmp_path):
    out, _ = ddp_run
    copy_out = tmp_path / "run"
    copy_out.mkdir()
    for name in ("last.pt", "config.json"):
        (copy_out / name).write_bytes((out / name).read_bytes())
    config = json.loads((out / "config.json").read_text())
    result = torchrun([*COMMON, "--data-root", config["data_root"], "--epochs", "2", "--warmup-epochs", "1", "--mixup",
                       "--output", copy_out, "--resume"], nproc=3)
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # torchrun's report: the worker exited with the usage-error status
    assert "error: --resume:" in result.stderr and "written by 2 process(es), this run has 3" in result.stderr
    assert torch.load(copy_out / "last.pt", weights_only=False)["epoch"] == 2  # untouched


def test_single_process_resume_of_a_two_process_run_is_refused(ddp_run, tmp_path, capsys):
    out, _ = ddp_run
    config = json.loads((out / "config.json").read_text())
    copy_out = tmp_path / "run"
    copy_out.mkdir()
    (copy_out / "last.pt").write_bytes((out / "last.pt").read_bytes())
    assert train.main([*COMMON, "--data-root", config["data_root"], "--epochs", "2", "--warmup-epochs", "1", "--mixup",
                       "--output", str(copy_out), "--resume"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "written by 2 process(es), this run has 1" in line and "--nproc-per-node 2" in line


def _torchrun_env(monkeypatch, local_rank: int = 0, world: int = 2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_proxy_isa_is_refused_with_more_than_one_process(monkeypatch, data_root, tmp_path, capsys):
    _torchrun_env(monkeypatch, local_rank=1)
    assert train.main([*COMMON, "--data-root", str(data_root), "--loss", "ProxyISA", "--output", str(tmp_path / "isa")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("python -m dmlfast.train (rank 1): error: --loss ProxyISA cannot train in 2 processes")
    assert "one process" in line and not (tmp_path / "isa").exists()


def test_cuda_without_a_gpu_for_this_rank_is_a_usage_error(monkeypatch, data_root, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.DistributedSetupError, match="CUDA is not available.*NCCL cannot run; use --device cpu"):
        distributed.device_for_rank("cuda", 0)
    assert distributed.device_for_rank(None, 3) == torch.device("cpu")  # default: no CUDA, so gloo on the CPU
    assert distributed.device_for_rank("cpu", 5) == torch.device("cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.device_for_rank("cuda", 1) == torch.device("cuda", 1)
    assert distributed.device_for_rank(None, 0) == torch.device("cuda", 0)
    for name in ("cuda", None):
        with pytest.raises(distributed.DistributedSetupError, match="LOCAL_RANK 2 has no GPU of its own, 2 are visible"):
            distributed.device_for_rank(name, 2)
    with pytest.raises(distributed.DistributedSetupError, match="each process uses cuda:LOCAL_RANK; pass --device cuda"):
        distributed.device_for_rank("cuda:1", 0)
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl" and distributed.backend_for("cpu") == "gloo"

    _torchrun_env(monkeypatch, local_rank=2, world=3)  # through the command line: one error line, status 2
    assert train.main([*COMMON, "--data-root", str(data_root), "--device", "cuda", "--output", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "(rank 2): error: --device cuda: process LOCAL_RANK 2 has no GPU" in line


def test_world_size_without_torchrun_is_a_usage_error(monkeypatch, data_root, tmp_path, capsys):
    _torchrun_env(monkeypatch)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert train.main([*COMMON, "--data-root", str(data_root), "--device", "cpu", "--output", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "error: WORLD_SIZE is 2 but the process group cannot start" in line
    assert "launch with torchrun" in line and not distributed.is_initialized()


def test_plain_run_is_single_process(monkeypatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.requested_world_size() == 1
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    model, loss_fn = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    assert distributed.replicate(model, loss_fn, "cpu") == (model, loss_fn)  # nothing wrapped
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(distributed.DistributedSetupError, match="WORLD_SIZE must be an integer"):
        distributed.requested_world_size()


# --- class-sharded proxies (--shard-proxies) -----------------------------------------------------

def _relabel_epochs(folder: Path, epochs: int) -> None:
    """Make a finished run's last.pt and its proxy shards look like part of an ``epochs``-epoch run."""
    for path in [folder / "last.pt", *folder.glob("last.shard-*-of-*.pt")]:
        state = torch.load(path, weights_only=False)
        state["config"]["epochs"] = epochs
        dmlfast.training.save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)


def test_sharded_proxies_split_the_table_and_resume_like_an_uninterrupted_run(data_root, tmp_path):
    args = [*COMMON, "--data-root", data_root, "--shard-proxies", "--resume"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _ok(torchrun([*args, "--epochs", "2", "--output", full]))
    _ok(torchrun([*args, "--epochs", "1", "--output", cut]))
    _relabel_epochs(cut, 2)
    resumed = _ok(torchrun([*args, "--epochs", "2", "--output", cut]))
    assert resumed.stdout.count("resumed from") == 1
    main_a, main_b = (torch.load(d / "last.pt", weights_only=False) for d in (full, cut))
    assert main_a["epoch"] == main_b["epoch"] == 2 and main_a["config"]["shard_proxies"] is True
    assert main_a["loss"] is None and main_a["optimizer"] is None  # the proxies live in the shard files
    for key, value in main_a["model"].items():
        torch.testing.assert_close(main_b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    rows = []
    for rank in range(2):
        a, b = (torch.load(d / f"last.shard-{rank}-of-2.pt", weights_only=False) for d in (full, cut))
        assert (full / f"best.shard-{rank}-of-2.pt").is_file()
        torch.testing.assert_close(b["loss"]["proxies"], a["loss"]["proxies"], rtol=0, atol=1e-6)
        proxy_group = a["optimizer"]["param_groups"][-1]["params"][-1]
        assert a["optimizer"]["state"][proxy_group]["exp_avg"].shape == a["loss"]["proxies"].shape  # Adam state sharded too
        rows.append(a["loss"]["proxies"].shape)
    assert rows == [(2, 16), (2, 16)]  # 4 training classes over 2 processes


def test_sharded_proxies_uneven_over_three_processes_learn(data_root, tmp_path):
    out = tmp_path / "three"
    _ok(torchrun([*COMMON, "--data-root", data_root, "--shard-proxies", "--loss", "NormSoftmax", "--epochs", "2",
                  "--output", out], nproc=3))
    shapes = [torch.load(out / f"last.shard-{rank}-of-3.pt", weights_only=False)["loss"]["proxies"].shape for rank in range(3)]
    assert shapes == [(2, 16), (1, 16), (1, 16)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["map@r"] > summary["before"]["map@r"]


def test_sharded_proxies_resume_without_a_matching_shard_file_is_a_usage_error(data_root, tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, "--data-root", data_root, "--shard-proxies", "--output", out, "--resume"]
    _ok(torchrun([*args, "--epochs", "1"]))
    _relabel_epochs(out, 2)
    shard = torch.load(out / "last.shard-1-of-2.pt", weights_only=False)
    (out / "last.shard-1-of-2.pt").unlink()
    result = torchrun([*args, "--epochs", "2"])
    assert result.returncode != 0
    assert "(rank 1): error: --resume: no such checkpoint:" in result.stderr and "last.shard-1-of-2.pt" in result.stderr
    shard["epoch"] = 0  # as if the run stopped after rank 0 saved epoch 1 but before rank 1 did
    dmlfast.training.save_checkpoint({k: v for k, v in shard.items() if k != "format"}, out / "last.shard-1-of-2.pt")
    result = torchrun([*args, "--epochs", "2"])
    assert result.returncode != 0
    assert "(rank 1): error: --resume:" in result.stderr and "holds the proxies after epoch 0" in result.stderr


def test_shard_proxies_flag_checks(data_root, tmp_path, capsys):
    base = [*COMMON, "--data-root", str(data_root), "--shard-proxies", "--output", str(tmp_path / "x")]
    assert train.main([*base, "--loss", "ProxyISA"]) == 2
    assert ("--shard-proxies: class-sharded proxies exist for --loss ProxyAnchor, ProxyNCA, NormSoftmax, IDML, CosFace, "
            "ArcFace, SubCenterArcFace, SoftTriple, not ProxyISA") \
        in capsys.readouterr().err
    assert train.main([*base, "--loss", "NormSoftmax", "--proxy-synthesis", "0.4,1.0"]) == 2
    assert "--shard-proxies cannot be combined with --proxy-synthesis" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- two gloo processes driving the helpers directly ---------------------------------------------

def _config(data_root) -> dict:
    return train.make_config(train.build_parser().parse_args([*COMMON, "--data-root", str(data_root), "--binary-eval"]))


def _eval_loader(config, splits, shard_id: int, num_shards: int):
    """Batches of 5 over the 24 held-out images: global batches 5, 5, 5, 5, 4 (rank 0 gets 3, rank 1 2)."""
    from dmlfast.data import make_loader

    return make_loader(splits.test, train=False, batch_size=5, device="cpu", loader="torch", image_size=16,
                       normalization="imagenet", num_workers=0, shard_id=shard_id, num_shards=num_shards)


def _rank_batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)


def _worker(rank: int, world: int, folder: str, data_root: str) -> None:
    """One of two gloo ranks (:func:`conftest.spawn_gloo_ranks`): writes ``folder/rank<r>.pt`` with what the tests compare."""
    import torch.distributed as dist

    from dmlfast.training import mixup_loss

    results = {}
    config = _config(data_root)
    splits = train.load_splits(config)
    torch.manual_seed(0)
    model = train.make_model(config)
    loader = _eval_loader(config, splits, rank, world)
    results["embeddings"], results["labels"] = train.embed_all(model, loader, torch.device("cpu"), None, False, "t", 16)
    results["metrics"] = train.evaluate_model(model, (loader, None), config, torch.device("cpu"), None, False)

    # Training steps through replicate(): warm-up (backbone frozen), then the rebuilt wrappers; mixup's second forward.
    loss_fn = dmlfast.ProxyAnchorLoss(4, 16)
    inputs_module = distributed.LossInputs(model, uncertainty=False)
    backbone = model.backbone_parameters()
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    model.train()
    results["grad_errors"], results["old_wrappers_alive"], old_wrappers = [], [], []
    gc.disable()  # wrappers are freed by replicate() itself, not by a collection that happens to run
    for step, warm in enumerate((True, False, False)):
        for p in backbone:
            p.requires_grad_(not warm)
        forward = criterion = cycle = None
        forward, criterion = distributed.replicate(inputs_module, loss_fn, "cpu")
        results["old_wrappers_alive"].append(sum(ref() is not None for ref in old_wrappers))
        old_wrappers = [weakref.ref(forward), weakref.ref(criterion)]
        assert all(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in (forward, criterion))
        cycle = [forward, criterion]
        cycle.append(cycle)  # as DDP's own construction sometimes leaves one: dropping the names does not free them
        images, labels = _rank_batch(rank, step)
        trainable = [p for p in (*model.parameters(), *loss_fn.parameters()) if p.requires_grad]
        plain, plain_loss = copy.deepcopy(inputs_module), copy.deepcopy(loss_fn)
        torch.manual_seed(step)
        local = plain_loss(*plain(images), labels) + mixup_loss(plain, plain_loss, images, labels)
        plain_trainable = [p for p in (*plain.parameters(), *plain_loss.parameters()) if p.requires_grad]
        expected = torch.autograd.grad(local, plain_trainable)
        for g in expected:
            dist.all_reduce(g)
            g /= world
        torch.manual_seed(step)
        loss = criterion(*forward(images), labels) + mixup_loss(forward, criterion, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        results["grad_errors"].append(max((p.grad - g).abs().max().item() for p, g in zip(trainable, expected)))
        results["frozen_grads"] = [p.grad is None for p in backbone] if warm else results.get("frozen_grads")
        optimizer.step()
    gc.enable()
    distributed.sync_buffers(model)
    results["model"], results["loss"] = copy.deepcopy(model.state_dict()), copy.deepcopy(loss_fn.state_dict())

    moving = dmlfast.MovingProxyLoss(4, 16)  # same initial proxies on both ranks (seeded below)
    moving.proxies.copy_(torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)), dim=1))
    g = torch.Generator().manual_seed(rank)
    embeddings = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (6,), generator=g)
    moving.update_proxies(distributed.all_gather_rows(embeddings), distributed.all_gather_rows(labels))
    results["moving"], results["moving_batch"] = moving.proxies.clone(), (embeddings, labels)
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def spawned(data_root, tmp_path_factory):
    """The two ranks' results of :func:`_worker`."""
    folder = tmp_path_factory.mktemp("spawned")
    spawn_gloo_ranks(_worker, 2, folder, str(data_root))
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_gathered_evaluation_equals_single_process_on_the_same_model(spawned, data_root):
    config = _config(data_root)
    splits = train.load_splits(config)
    torch.manual_seed(0)
    model = train.make_model(config)
    loader = _eval_loader(config, splits, 0, 1)
    embeddings, labels = train.embed(model, loader, torch.device("cpu"), None, False, "t")
    metrics = train.evaluate_model(model, (loader, None), config, torch.device("cpu"), None, False)
    assert "binary_recall@1" in metrics and 0 < metrics["map@r"] < 1
    for result in spawned:  # every rank holds the gathered set in dataset order and rank 0's metrics
        assert torch.equal(result["labels"], labels) and torch.equal(result["labels"], torch.as_tensor(splits.test.labels))
        torch.testing.assert_close(result["embeddings"], embeddings, rtol=0, atol=1e-6)
        assert result["metrics"] == metrics


def test_ddp_gradients_are_the_ranks_mean_across_warm_up_rebuild_and_mixup(spawned):
    for result in spawned:
        assert len(result["grad_errors"]) == 3 and max(result["grad_errors"]) < 1e-5, result["grad_errors"]
        assert result["frozen_grads"] and all(result["frozen_grads"])  # warm-up: the frozen backbone got no gradient
        assert result["old_wrappers_alive"] == [0, 0, 0]  # each rebuild freed the previous wrappers and their reducers


def test_replicas_are_identical_after_training(spawned, data_root):
    a, b = spawned
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs between the ranks"
    torch.manual_seed(0)
    initial = train.make_model(_config(data_root)).state_dict()
    changed = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, a["model"][k])]
    assert "embedding.weight" in changed and any(k.startswith("backbone.") for k in changed)  # it did train, backbone too


def test_moving_proxies_move_by_the_gathered_global_batch(spawned):
    a, b = spawned
    assert torch.equal(a["moving"], b["moving"])
    reference = dmlfast.MovingProxyLoss(4, 16)
    reference.proxies.copy_(torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)), dim=1))
    before = reference.proxies.clone()
    reference.update_proxies(torch.cat([a["moving_batch"][0], b["moving_batch"][0]]), torch.cat([a["moving_batch"][1], b["moving_batch"][1]]))
    torch.testing.assert_close(a["moving"], reference.proxies, rtol=0, atol=1e-6)
    assert not torch.equal(reference.proxies, before)


def test_shard_proxies_help_names_the_losses_that_have_shards():
    """--help says every loss but ProxyISA and Moving can be sharded: check it against the table."""
    from dmlfast.losses import LOSSES
    from dmlfast.sharded import SHARDED_LOSSES

    assert set(LOSSES) - set(SHARDED_LOSSES) == {"ProxyISA", "Moving"}
    assert "every loss but ProxyISA and Moving" in " ".join(train.build_parser().format_help().split())
