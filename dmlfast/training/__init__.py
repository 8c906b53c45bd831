"""A training run and what the commands do with its checkpoints, as a library under
``python -m dmlfast.train``, ``evaluate``, ``retrieve`` and ``plot``:

- :mod:`.config`: the run's configuration (recipe + flags), its checks, what may change on resume;
- :mod:`.setup`: device, autocast, dataset, loaders, model, loss and optimizer from a configuration,
  and a trained model restored from a checkpoint;
- :mod:`.loop`: the training loop (start, epoch, step, end) and :func:`~.loop.train`;
- :mod:`.embedding`: embedding images with a model, the metrics of a model on the held-out classes;
- :mod:`.gallery`: the retrieval demo's gallery (embedded once, cached) and its search;
- :mod:`.checkpoint`: atomic checkpoints with RNG state; :mod:`.logs`: JSON lines, optional
  TensorBoard / Weights & Biases mirrors, a PNG of the curves; :mod:`.mixup`: IDML's image-level
  mixup; :mod:`.distributed`: data-parallel training under torchrun (imported as a module:
  ``from dmlfast.training import distributed``).
"""
from .checkpoint import (CheckpointError, CheckpointWriteError, load_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint,
                         set_rng_state)
from .logs import NullLogger, RunLogger, TrackingUnavailableError, check_trackers, plot_curves
from .mixup import mixup_loss

__all__ = ["CheckpointError", "CheckpointWriteError", "NullLogger", "RunLogger", "TrackingUnavailableError", "check_trackers", "load_checkpoint", "mixup_loss", "plot_curves", "remove_stale_temporaries", "rng_state", "save_checkpoint", "set_rng_state"]
