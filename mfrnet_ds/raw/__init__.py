"""Readers of the three raw trees as distributed; each turns a root folder into records.

A dataset is one module here with `NAME`, `PROTOCOL` (raw/record.py: image size, camera and id ranges, side-by-side
files, what the gallery filter matches, whether missing modalities are evaluated) and `read(root) -> RawDataset`,
registered below. Its layout and naming rules are in the module's docstring; docs/ARCHITECTURE.md lists the rest
of what a new dataset needs (a YAML under configs/).
"""
from mfrnet_ds.raw import msvr310, rgbnt100, rgbnt201
from mfrnet_ds.raw.record import MODALITIES, SPLITS, LayoutError, Problem, Protocol, RawDataset, Record

DATASETS = {m.NAME: m for m in (rgbnt201, rgbnt100, msvr310)}
READERS = {name: m.read for name, m in DATASETS.items()}
PROTOCOLS: dict[str, Protocol] = {name: m.PROTOCOL for name, m in DATASETS.items()}


def read_raw(dataset: str, root) -> RawDataset:
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(sorted(READERS))}")
    return READERS[dataset](root)


__all__ = ["DATASETS", "READERS", "PROTOCOLS", "MODALITIES", "SPLITS", "LayoutError", "Problem", "Protocol",
           "RawDataset", "Record", "read_raw"]
