"""The public import path of the ranking metrics, `from mfrnet_ds.metrics import evaluate_rank`.

Only an alias kept stable for users (README): the code is mfrnet_ds/eval/metrics.py, and the package's own
modules import from there.
"""

from mfrnet_ds.eval.metrics import evaluate_rank

__all__ = ["evaluate_rank"]
