"""Progress bars, and one switch that silences them.

Long work shows a tqdm bar on stderr: rendering the glyph set, checking a dataset's images, the
exact search's similarity tiles, and (through their ``progress`` arguments) training epochs and
embedding. Inside ``with progress_bars(False):`` none of the bars made by :func:`progress_bar`
appears, whatever a function's own ``progress`` argument says; the commands run inside it with
``--no-progress`` (:func:`dmlfast._cli.run_command`), so that a log file gets no bar at all.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_enabled = True


def bars_enabled() -> bool:
    """Whether bars may be shown here (``False`` inside ``progress_bars(False)``)."""
    return _enabled


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (``True``) or silence (``False``) the bars of :func:`progress_bar` inside the ``with`` block."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"progress_bars: enabled must be a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def progress_bar(iterable=None, *, enabled: bool = True, **options):
    """``tqdm(iterable, **options)``, shown when ``enabled`` and bars are not silenced (:func:`progress_bars`)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and _enabled), **options)
