"""The trainer: a Trainer state object, the loop over engine/step.py's train_step, and (every, fn) hooks
for logging, checkpoints, evaluation and the end-of-run files."""
from mfrnet_ds.trainer.loop import train
from mfrnet_ds.trainer.setup import SetupError
from mfrnet_ds.trainer.signals import StoppedBySignal

__all__ = ["SetupError", "StoppedBySignal", "train"]
