"""Evaluation: embedding extraction and ranking metrics (CMC, mAP)."""
