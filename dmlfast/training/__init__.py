"""Training helpers used by ``python -m dmlfast.train``: atomic checkpoints with RNG state
(:mod:`.checkpoint`) and run logs (:mod:`.logs`: JSON lines, TensorBoard when installed, a PNG of the curves)."""
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logs import RunLogger, plot_curves

__all__ = ["CheckpointError", "RunLogger", "load_checkpoint", "plot_curves", "rng_state", "save_checkpoint", "set_rng_state"]
