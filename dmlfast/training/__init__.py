"""Training helpers used by ``python -m dmlfast.train``: atomic checkpoints with RNG state
(:mod:`.checkpoint`) and run logs (:mod:`.logs`: JSON lines, optional TensorBoard / Weights & Biases mirrors, a PNG of the curves)."""
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logs import RunLogger, TrackingUnavailableError, check_trackers, plot_curves

__all__ = ["CheckpointError", "RunLogger", "TrackingUnavailableError", "check_trackers", "load_checkpoint", "plot_curves", "rng_state", "save_checkpoint", "set_rng_state"]
