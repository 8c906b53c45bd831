"""The source distribution carries everything a build needs: the custom build backend and its
helpers, every C++/CUDA source and header, the docs (MANIFEST.in). Built from a copy of the tracked
files, so that the checkout gets no egg-info or dist folder."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_files():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [name for name in listed.splitlines() if (ROOT / name).is_file()]


def test_sdist_holds_what_the_build_needs(tmp_path):
    files = tracked_files()
    tree = tmp_path / "tree"
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("dmlfast-*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = [name for name in files
              if name.startswith(("csrc/", "build_tools/", "dmlfast/", "docs/"))
              or name in ("setup.py", "pyproject.toml", "build_backend.py", "CMakeLists.txt", "README.md")]
    assert [name for name in needed if name not in packed] == []
