"""Streaming loaders over the shards: identity-balanced training batches and distributed evaluation.

Training (`train_loader`). Every step draws ONE global batch of P identities x K instances
(`train.global_batch`) from the whole training set, the same on every rank and for every world size;
each rank then decodes and augments only its share. The global batch is cut into `accum` global micro
batches (consecutive, whole identities), and each of those into `world_size` contiguous slices of
m = global / (accum x world) samples: rank r gets samples [a G/accum + r m, a G/accum + (r+1) m) of
micro step a. Contiguous slices in rank order make "all ranks' slices, concatenated" exactly the
batch one process would see, so an all-gather rebuilds it without reordering, and they work for any
even split, also when a slice holds part of an identity (P < world size): mining and BNNeck run on the
gathered global micro batch, not on the slice.

Sampling. There are S = max(1, num_workers) logical streams whatever the world size; global batch b
comes from stream b mod S, and the DataLoader visits workers round robin, so physical worker w runs
logical stream (w + start_batch) mod S and resuming at start_batch keeps the order. In every pass
over the data the train shards are shuffled by (seed, epoch, pass) and stream s reads shards s, s + S,
... When that cannot give every stream P identities (fewer shards than streams, or too few identities
in the smallest shards), every stream reads every shard and keeps its share instead: identities
(label mod S) when each share still holds P identities, else samples (position in shard mod S). A
stream groups the consecutive samples of an identity (the builder stores identities whole), cuts each
into chunks of K (an identity with fewer than K images is padded by repeats, as the reference's
RandomIdentitySampler does), and emits a batch once its pool holds pool_factor (data.pool_factor, 4) x P
identities (or, at the end of a pass, P): P distinct identities, one chunk each. The stream cycles through passes, so it yields
exactly `batches_per_epoch` batches however the shards are sized. Every rank reads every shard's
records (cheap) to run the same draw; decoding and augmentation, the expensive part, happen only for
its own slice. A sample that does not decode is replaced by another of the same chunk, else by
another sample of the global batch (with that sample's label), so damage never changes the draw of
later batches and every rank stays in step. Each sample's augmentation is drawn from torch's
generator seeded by (seed, epoch, batch index, position in the global batch), under `fork_rng`, so it
does not depend on which rank holds the sample and the caller's RNG is untouched.

Evaluation (`eval_loader`). Positions 0..N-1 of the split (shard order, then stored order) are cut
into `world_size` contiguous ranges; every rank yields ceil(ceil(N / world) / batch) full batches,
padding with repeats of its first sample marked invalid. A rank's workers take contiguous blocks of
its batches. A damaged sample (cut from its shard, incomplete, or not decoding) keeps its row, so the
batch count and shapes stay what every rank expects, but the row holds a blank stand-in: a zero image,
camid 0 (in range for any camera embedding), pid and sceneid -1, valid = False and damaged = True.
The stand-in goes through the model like padding and is dropped after the gather (eval/embed.py);
`EvalStream.shard_of` names the shard of a position, for the report of what was damaged.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from mfrnet_ds.config import DataConfig, UserError
from mfrnet_ds.stream.eval_stream import EvalStream
from mfrnet_ds.stream.reader import read_manifest
from mfrnet_ds.stream.train_stream import TrainStream

__all__ = ["train_loader", "eval_loader", "read_manifest", "check_shared_memory", "SharedMemoryError"]

PREFETCH = 2   # batches each worker keeps ready


class SharedMemoryError(UserError):
    pass


def check_shared_memory(num_workers: int, batch_bytes: int, shm: str | Path = "/dev/shm") -> None:
    """Workers hand batches over in shared memory (/dev/shm): with too little of it (Docker's default is 64 MB)
    a worker dies of SIGBUS in the middle of a batch. Say so before starting them."""
    if num_workers == 0 or not Path(shm).is_dir():
        return
    need = num_workers * (PREFETCH + 1) * batch_bytes   # the batches in flight, and one being filled
    free = shutil.disk_usage(shm).free
    if free < need:
        raise SharedMemoryError(
            f"{shm} has {free / 2**20:.0f} MiB free, but data.num_workers={num_workers} loader workers hold up "
            f"to {num_workers * (PREFETCH + 1)} batches of {batch_bytes / 2**20:.0f} MiB there: give the container "
            f"more (e.g. docker run --shm-size={max(1, math.ceil(2 * need / 2**30))}g) or set data.num_workers "
            f"lower (0 loads in the training process, without shared memory)")


def _loader(dataset: IterableDataset, num_workers: int, batch_bytes: int, pin_memory: bool = False) -> DataLoader:
    check_shared_memory(num_workers, batch_bytes)
    # batch_size=None: the dataset yields whole batches (P x K is assembled in the stream). pin_memory (CUDA):
    # page-locked batches, so the step's non_blocking copies to the device overlap with compute.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=PREFETCH if num_workers > 0 else None)


def _batch_bytes(rows: int, img_size, element_size: int) -> int:
    return rows * 3 * 3 * int(img_size[0]) * int(img_size[1]) * element_size


def train_loader(shards_dir, *, global_batch: int, num_instances: int, img_size, batches_per_epoch=None,
                 num_workers: int = 2, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1, start_batch: int = 0, augment: bool = True, aligned: bool = True,
                 pin_memory: bool = False, epochs: int = 1,
                 pool_factor: int = DataConfig.pool_factor) -> DataLoader:
    """This rank's share of each global batch of P ids x K: {"images" (accum x m, 3, 3, H, W) uint8, "erase"
    (the blocks to erase: `augment.erase_`), "labels", "camids"}, its slice of every micro step in micro
    order (m = global / (accum x world)); exactly batches_per_epoch - start_batch of them on every rank, then
    batches_per_epoch for each of the `epochs` - 1 epochs after. One loader for several epochs keeps its
    workers (and their shard readers) across epoch boundaries: the next epoch's first batches are ready when
    the last ones of this epoch are used. See the module doc."""
    dataset = TrainStream(shards_dir, global_batch=global_batch, num_instances=num_instances, img_size=img_size,
                          batches_per_epoch=batches_per_epoch, num_workers=num_workers, seed=seed, epoch=epoch,
                          rank=rank, world_size=world_size, accum=accum, start_batch=start_batch, augment=augment,
                          aligned=aligned, epochs=epochs, pool_factor=pool_factor)
    return _loader(dataset, num_workers, _batch_bytes(global_batch // world_size, img_size, 1), pin_memory)


def eval_loader(shards_dir, split: str, *, batch_size: int, img_size, rank: int = 0, world_size: int = 1,
                num_workers: int = 1) -> DataLoader:
    """Batches {"images", "pids", "camids", "sceneids", "index", "valid", "damaged"} of exactly batch_size;
    the same count on every rank; valid=False marks padding and damaged samples, damaged=True the damaged
    ones (blank stand-ins, camid 0: see the module doc)."""
    dataset = EvalStream(shards_dir, split, batch_size=batch_size, img_size=img_size, rank=rank,
                         world_size=world_size, num_workers=num_workers)
    return _loader(dataset, num_workers, _batch_bytes(batch_size, img_size, 4))
