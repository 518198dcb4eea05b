"""Public ranking metrics: `from mfrnet_ds.metrics import evaluate_rank`."""

from mfrnet_ds.eval.metrics import evaluate_rank

__all__ = ["evaluate_rank"]
