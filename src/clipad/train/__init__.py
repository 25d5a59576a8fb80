"""Training of learned methods (:class:`~clipad.methods.base.LearnedDetector`): the loop
(:mod:`.loop`), resumable state (:mod:`.state`) and the official data handling (:mod:`.sampling`).
``clipad train`` is :mod:`clipad.cli.train`.
"""

from .loop import LOG_CSV, LOG_JSON, TrainConfig, TrainResult, fit, make_optimizer, train_step
from .sampling import ReferenceSampler, epoch_orders, official_image_transform, official_mask
from .state import CHECKPOINT_DIR, epoch_paths, last_checkpoint, load_optimizer, save_optimizer

__all__ = [
    "CHECKPOINT_DIR", "LOG_CSV", "LOG_JSON", "ReferenceSampler", "TrainConfig", "TrainResult", "epoch_orders",
    "epoch_paths", "fit", "last_checkpoint", "load_optimizer", "make_optimizer", "official_image_transform",
    "official_mask", "save_optimizer", "train_step",
]
