"""Readers of the three raw trees as distributed; each turns a root folder into records.

A dataset is one module in this folder with `NAME`, `PROTOCOL` (raw/record.py: image size, camera and id ranges,
side-by-side files, what the gallery filter matches, whether missing modalities are evaluated) and
`read(root) -> RawDataset`; every such module is found here by itself. Its layout and naming rules are in the
module's docstring; docs/ARCHITECTURE.md says what else a new dataset needs (a YAML under configs/).
"""
import importlib
import pkgutil

from mfrnet_ds.config import MODALITIES
from mfrnet_ds.raw.record import SPLITS, LayoutError, Problem, Protocol, RawDataset, Record


def _readers() -> dict:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if all(hasattr(module, a) for a in ("NAME", "PROTOCOL", "read")):
            found[module.NAME] = module
    return found


DATASETS = _readers()
READERS = {name: m.read for name, m in DATASETS.items()}
PROTOCOLS: dict[str, Protocol] = {name: m.PROTOCOL for name, m in DATASETS.items()}


def read_raw(dataset: str, root) -> RawDataset:
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(sorted(READERS))}")
    return READERS[dataset](root)


__all__ = ["DATASETS", "READERS", "PROTOCOLS", "MODALITIES", "SPLITS", "LayoutError", "Problem", "Protocol",
           "RawDataset", "Record", "read_raw"]
