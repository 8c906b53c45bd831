"""Learning-rate schedules (dmlfast.training.schedule): ProxyNCA++'s plateau-then-multistep schedule's
learning-rate sequence, its validation split, its configuration checks, and a run with it."""
import json

import numpy as np
import pytest
import torch

from dmlfast import train
from dmlfast.checks import InputError
from dmlfast.data import ImageList
from dmlfast.training.schedule import EpochSchedule, check_schedule, parse_milestones, validation_split
from test_train import TINY

BASE_LR = 4e-3


def _schedule(**config):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": BASE_LR},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": BASE_LR * 1e5}]
    optimizer = torch.optim.Adam(groups, lr=BASE_LR)
    defaults = dict(lr_schedule="plateau", warmup_epochs=5, lr_gamma=0.1, lr_patience=4, lr_step=0, lr_milestones=[])
    return EpochSchedule(optimizer, {**defaults, **config}), optimizer


def _run(schedule, optimizer, recalls, epochs=45):
    """Each epoch's learning rate (group 0) over ``epochs`` epochs, stepping with ``recalls[epoch]`` when asked."""
    rates = []
    for epoch in range(1, epochs + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves; the schedule steps after the optimizer, as in training
        schedule.step(epoch, recalls.get(epoch) if schedule.needs_validation(epoch) else None)
    return rates


# Validation Recall@1 after each epoch past the 5 warm-up epochs: better until epoch 10, no better in 11-20,
# better again in 21-25 (after two drops), then no better.
RECALLS = {e: 0.5 + 0.02 * (e - 5) for e in range(6, 11)}
RECALLS.update({e: 0.55 for e in range(11, 21)})
RECALLS.update({e: 0.6 + 0.01 * (e - 20) for e in range(21, 26)})
RECALLS.update({e: 0.6 for e in range(26, 46)})
DROPS = [16, 21, 31, 36, 41, 46]


def test_proxynca_plateau_schedule_learning_rates():
    schedule, optimizer = _schedule()
    rates = _run(schedule, optimizer, RECALLS)
    # 5 epochs without a better Recall@1 (patience 4) lower the rate x0.1 from the next epoch: 11-15 -> 16,
    # 16-20 -> 21; 21-25 improve (the counter restarts); 26-30 -> 31, then 36, 41 and 46 (cooldown 0).
    expected = [BASE_LR * 0.1 ** sum(drop <= epoch for drop in DROPS) for epoch in range(1, 46)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    assert rates[:15] == [BASE_LR] * 15  # warm-up epochs and the first 10 scheduled epochs at the base rate
    assert schedule.drops == DROPS and schedule.best == (25, pytest.approx(0.65))
    assert optimizer.param_groups[1]["lr"] == pytest.approx(BASE_LR * 1e5 * 0.1 ** 6)  # every group lowered
    assert schedule.summary() == {"lr_drops": DROPS, "best_validation": {"epoch": 25, "recall@1": pytest.approx(0.65)}}
    # the second run: all training classes, the drops up to the best epoch, stopping there
    assert schedule.rerun_flags() == "--lr-schedule multistep --lr-milestones 16,21 --epochs 25"


def test_multistep_replays_the_recorded_drops():
    """The published second run: MultiStepLR at the first run's drops reproduces its learning rates."""
    plateau, plateau_optimizer = _schedule()
    first = _run(plateau, plateau_optimizer, RECALLS)
    replay, optimizer = _schedule(lr_schedule="multistep", lr_milestones=[e for e in plateau.drops if e <= 45])
    assert plateau.drops[-1] == 46  # lowers the rate after the last epoch: no epoch trains at it
    assert _run(replay, optimizer, {}) == pytest.approx(first, rel=1e-12)


def test_warmup_epochs_are_outside_the_plateau_schedule():
    schedule, optimizer = _schedule(warmup_epochs=3)
    assert [schedule.needs_validation(e) for e in (1, 3, 4)] == [False, False, True]
    with pytest.raises(ValueError, match="needs the validation Recall@1 after epoch 4"):
        schedule.step(4, None)


def test_schedule_state_resumes_exactly():
    whole, whole_optimizer = _schedule()
    expected = _run(whole, whole_optimizer, RECALLS)
    first, optimizer = _schedule()
    rates = []
    for epoch in range(1, 19):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        first.step(epoch, RECALLS.get(epoch) if first.needs_validation(epoch) else None)
    resumed, resumed_optimizer = _schedule()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    for epoch in range(19, 46):
        rates.append(resumed_optimizer.param_groups[0]["lr"])
        resumed_optimizer.step()
        resumed.step(epoch, RECALLS.get(epoch) if resumed.needs_validation(epoch) else None)
    assert rates == pytest.approx(expected, rel=1e-12) and resumed.drops == whole.drops
    step, step_optimizer = _schedule(lr_schedule="step", lr_step=2, lr_gamma=0.5)
    legacy = torch.optim.lr_scheduler.StepLR(step_optimizer, step_size=2, gamma=0.5)
    step_optimizer.step()
    legacy.step()
    step.load_state_dict(legacy.state_dict())  # a checkpoint written before EpochSchedule
    assert step.inner.last_epoch == 1


def test_validation_split_is_the_published_halves():
    labels = np.repeat(np.arange(100), 3)
    train_list = ImageList([f"{i}.jpg" for i in range(300)], labels, [f"c{i:03d}" for i in range(100)], "CUB", "train")
    first, second = validation_split(train_list)
    assert first.num_classes == second.num_classes == 50 and len(first) == len(second) == 150
    assert first.class_ids == [f"c{i:03d}" for i in range(50)] and second.class_ids[0] == "c050"
    assert second.labels.min() == 0 and second.paths[0] == "150.jpg" and second.split == "validation"
    few = ImageList(["a", "b", "c"], np.array([0, 1, 2]), ["x", "y", "z"], "folder", "train")
    with pytest.raises(InputError, match="has 3 classes"):
        validation_split(few)


def test_schedule_configuration(tmp_path):
    def config(*args):
        return train.make_config(train.build_parser().parse_args([*args, "--data-root", str(tmp_path)]))

    nca = config("--dataset", "CUB", "--loss", "ProxyNCA")
    assert (nca["lr_schedule"], nca["lr_gamma"], nca["lr_patience"], nca["warmup_epochs"], nca["epochs"]) == ("plateau", 0.1, 4, 5, 45)
    assert config("--dataset", "SOP", "--loss", "ProxyNCA")["epochs"] == 85
    rerun = config("--dataset", "CUB", "--loss", "ProxyNCA", "--lr-milestones", "17,30", "--epochs", "33")
    assert (rerun["lr_schedule"], rerun["lr_milestones"]) == ("multistep", [17, 30])
    assert config("--dataset", "CUB")["lr_schedule"] == "step"
    assert parse_milestones("3,8") == (3, 8)
    for text in ("8,3", "0,2", "a"):
        with pytest.raises(ValueError, match="expected"):
            parse_milestones(text)
    base = dict(lr_schedule="multistep", lr_milestones=[], epochs=10, warmup_epochs=0, lr_patience=4)
    for changes, says in ((dict(), "needs --lr-milestones"), (dict(lr_milestones=[12]), "past --epochs 10"),
                          (dict(lr_schedule="step", lr_milestones=[2]), "applies to --lr-schedule multistep"),
                          (dict(lr_schedule="plateau", warmup_epochs=10), "starts after the 10 warm-up epochs"),
                          (dict(lr_schedule="cosine"), "must be one of")):
        with pytest.raises(InputError, match=says):
            check_schedule({**base, **changes})


def test_run_with_the_plateau_schedule(tmp_path):
    from test_train import _write_tiny_omniglot

    root = _write_tiny_omniglot(tmp_path / "omniglot")
    out = tmp_path / "run"
    assert train.main([*TINY, "--data-root", str(root), "--output", str(out), "--loss", "ProxyNCA", "--lr-schedule", "plateau",
                       "--lr-patience", "0", "--epochs", "3", "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "step" and r["epoch"] == 1]) == 24 // 4  # 3 of the 6 classes train
    assert all(0 <= h["validation_recall@1"] <= 1 for h in summary["history"][1:])
    assert "lr_drops" in summary and summary["best_validation"]["epoch"] in (1, 2, 3)
    config = json.loads((out / "config.json").read_text())
    lrs = {r["epoch"]: r["lr"] for r in records if r["kind"] == "step"}
    assert all(lrs[e] == pytest.approx(config["lr"] * config["lr_gamma"] ** sum(d <= e for d in summary["lr_drops"]))
               for e in lrs)
