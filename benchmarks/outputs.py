"""Where the benchmarks write their figures: never over an earlier run's file unasked."""
import sys
from pathlib import Path


def add_overwrite_argument(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's output file")


def refuse_existing(path, overwrite: bool, flag: str) -> None:
    """Exit with one error line (status 2) before any work when ``path`` exists and ``overwrite`` is
    false: an earlier run's figures are replaced only when asked."""
    if path is not None and Path(path).exists() and not overwrite:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {flag} {path} holds an earlier run's figures; "
                         "pass --overwrite to replace it, or choose another path\n")
        sys.exit(2)
