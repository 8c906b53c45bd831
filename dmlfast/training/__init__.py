"""Training helpers used by ``python -m dmlfast.train``: atomic checkpoints with RNG state
(:mod:`.checkpoint`), IDML's image-level mixup (:mod:`.mixup`), run logs (:mod:`.logs`: JSON lines, optional TensorBoard / Weights & Biases mirrors, a PNG of the curves) and data-parallel training under torchrun (:mod:`.distributed`, imported as a module: ``from dmlfast.training import distributed``)."""
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logs import NullLogger, RunLogger, TrackingUnavailableError, check_trackers, plot_curves
from .mixup import mixup_loss

__all__ = ["CheckpointError", "NullLogger", "RunLogger", "TrackingUnavailableError", "check_trackers", "load_checkpoint", "mixup_loss", "plot_curves", "rng_state", "save_checkpoint", "set_rng_state"]
