"""Streaming data: shards -> augmented, identity-balanced training batches and evaluation batches.

Entry points live in `mfrnet_ds.stream.pipeline`: `train_loader`, `eval_loader`, `read_manifest`.
"""
