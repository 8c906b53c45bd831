"""Training helpers used by ``python -m dmlfast.train``: atomic checkpoints with RNG state
(:mod:`.checkpoint`), IDML's image-level mixup (:mod:`.mixup`) and run logs (:mod:`.logs`: JSON lines, optional TensorBoard / Weights & Biases mirrors, a PNG of the curves)."""
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logs import RunLogger, TrackingUnavailableError, check_trackers, plot_curves
from .mixup import mixup_loss

__all__ = ["CheckpointError", "RunLogger", "TrackingUnavailableError", "check_trackers", "load_checkpoint", "mixup_loss", "plot_curves", "rng_state", "save_checkpoint", "set_rng_state"]
