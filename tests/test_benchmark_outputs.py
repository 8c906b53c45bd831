"""The benchmark scripts never write over an earlier run's figures unless asked (--overwrite,
DMLFAST_OVERWRITE=1 for the GPU check scripts); they refuse before any work."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["bench_losses.py", "bench_sharded.py", "bench_train.py"])
def test_json_of_an_earlier_run_is_refused(tmp_path, script):
    earlier = tmp_path / "figures.json"
    earlier.write_text('{"earlier": true}')
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--json", str(earlier)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert f"--json: {earlier} exists; pass --overwrite" in done.stderr
    assert earlier.read_text() == '{"earlier": true}'


@pytest.mark.parametrize("script, log", [("gpu_check.sh", "gpu_check.log"), ("gpu_train_check.sh", "gpu_train_check.log")])
def test_gpu_check_refuses_a_folder_with_an_earlier_run(tmp_path, script, log):
    (tmp_path / log).write_text("earlier run\n")
    env = {**os.environ, "DMLFAST_GPU_CHECK_OUT": str(tmp_path)}
    env.pop("DMLFAST_OVERWRITE", None)
    done = subprocess.run(["bash", str(BENCHMARKS / script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "holds an earlier run's results" in done.stderr
    assert (tmp_path / log).read_text() == "earlier run\n"


def test_loss_table_without_the_gemm_floor(monkeypatch):
    """bench_losses.py --implementations dmlfast (no gemm3, e.g. a memory-only run) prints its
    table with n/a where the floor and the ratios to it would be."""
    import importlib.util
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbours, as when run
    spec = importlib.util.spec_from_file_location("bench_losses", BENCHMARKS / "bench_losses.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = {name: {} for name in bench.IMPLEMENTATIONS}
    figures["dmlfast"] = {"median_ms": 11042.5, "min_ms": 11042.5, "extra_peak_mb": 71.1}
    args = SimpleNamespace(batch=256, dim=512, device="cpu", threads=1, repeats=1, warmup=0)
    table = bench.markdown_table([{"case": "1M", "loss": "proxy_nca", "classes": 1_000_000, "figures": figures}], args)
    assert "| proxy_nca | 1,000,000 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 71 | n/a | n/a | n/a | 977 |" in table
