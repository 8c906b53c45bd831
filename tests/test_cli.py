"""What the commands share (``dmlfast._cli``): one-line parser errors, names in any case, CPU threads."""
import os

import pytest
import torch

from dmlfast import _cli


def test_parser_errors_are_one_line_with_status_2(capsys):
    parser = _cli.Parser(prog="python -m dmlfast.x")
    parser.add_argument("--loss", type=_cli.name_choice("loss", ["ProxyAnchor", "ProxyNCA"]))
    assert parser.parse_args(["--loss", "PROXYNCA"]).loss == "ProxyNCA"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--loss", "proxyanchr"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == ("python -m dmlfast.x: error: argument --loss: unknown loss 'proxyanchr'; did you "
                                            "mean ProxyAnchor? (choose one of ProxyAnchor or ProxyNCA) "
                                            "(see python -m dmlfast.x --help)\n")


def test_threads_leave_the_loader_workers_their_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert _cli.share_cores_with_loader(2) is None and torch.get_num_threads() == before  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert _cli.share_cores_with_loader(2) == max(1, cores - 2) == torch.get_num_threads()
        assert _cli.share_cores_with_loader(0) == cores == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
