"""What the training and the evaluation stream share: one generator per DataLoader worker, batch tensors in
shared memory, the image size check."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import get_worker_info


def check_size(img_size) -> tuple[int, int]:
    if len(tuple(img_size)) != 2 or any(int(v) <= 0 for v in img_size):
        raise ValueError(f"img_size={img_size!r}: expected (H, W), e.g. (256, 128)")
    return int(img_size[0]), int(img_size[1])


def round_robin(generators: list[Iterator]) -> Iterator:
    """What a DataLoader does with one generator per worker: one item from each in turn."""
    active = list(generators)
    while active:
        for gen in list(active):
            try:
                yield next(gen)
            except StopIteration:
                active.remove(gen)


def empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch tensor; inside a DataLoader worker it is allocated in shared memory, as default_collate
    does, so handing it to the main process costs no copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    storage = empty.untyped_storage()._new_shared(math.prod(shape) * empty.element_size())
    return empty.set_(storage).view(shape)
