"""Readers of the three raw trees as distributed; each turns a root folder into records.

`READERS[name](root) -> RawDataset`; each reader's module docstring
gives its tree's layout and naming rules (README.md, "Data: raw datasets -> shards": the shards they become).
"""
from mfrnet_ds.config import MODALITIES
from mfrnet_ds.raw import msvr310, rgbnt100, rgbnt201
from mfrnet_ds.raw.record import SPLITS, LayoutError, Problem, RawDataset, Record

READERS = {
    rgbnt201.NAME: rgbnt201.read,
    rgbnt100.NAME: rgbnt100.read,
    msvr310.NAME: msvr310.read,
}

#: Side-by-side layouts: one file per sample holding all modalities left to right.
SIDE_BY_SIDE = {rgbnt100.NAME}


def read_raw(dataset: str, root) -> RawDataset:
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(sorted(READERS))}")
    return READERS[dataset](root)


__all__ = ["READERS", "SIDE_BY_SIDE", "MODALITIES", "SPLITS", "LayoutError", "Problem", "RawDataset", "Record",
           "read_raw"]
