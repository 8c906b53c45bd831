"""Where the benchmarks write their figures: never over an earlier run's file unasked
(dmlfast.checks.require_new_files, the commands' rule, as one error line and exit status 2)."""
import sys
from pathlib import Path

from dmlfast.checks import InputError, require_new_files


def add_overwrite_argument(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's output file")


def refuse_existing(path, overwrite: bool, flag: str) -> None:
    """Exit with one error line (status 2) before any work when ``path`` exists and ``overwrite`` is false."""
    try:
        require_new_files(flag, None if path is None else Path(path), overwrite=overwrite)
    except InputError as error:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {error}\n")
        sys.exit(2)
