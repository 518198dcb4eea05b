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

import itertools
import math
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from mfrnet_ds.config import DataConfig, UserError
from mfrnet_ds.stream import augment as aug
from mfrnet_ds.stream.reader import Damage, RawSample, decode, iter_shard, read_manifest
from mfrnet_ds.stream.source import ShardSource

__all__ = ["train_loader", "eval_loader", "read_manifest", "stream_sources", "split_mode", "TrainStream", "EvalStream"]

_SHARD_END, _PASS_END = object(), object()
MAX_DROPPED = 100  # consecutive undecodable batches after which the shards are called damaged, not unlucky


def stream_sources(shards: list[str], *, seed: int, epoch: int, pass_index: int, stream: int,
                   num_streams: int, shared: bool) -> list[tuple[str, int, int]]:
    """(shard, part, parts) that `stream` reads in one pass; with parts > 1 it keeps the share
    `part` of each shard. Every stream computes the same shuffle, so the shares are disjoint."""
    order = list(shards)
    np.random.default_rng([seed, epoch, pass_index, 7]).shuffle(order)
    if not shared:
        return [(name, 0, 1) for name in order[stream::num_streams]]
    return [(name, stream, num_streams) for name in order]


def split_mode(shard_ids: list[int], num_classes: int, num_streams: int, p: int) -> str:
    """How streams share the train shards: "shard" (each reads its own shards) when any assignment
    gives each stream at least p identities, else "label" or "sample" shares of every shard."""
    per_stream = len(shard_ids) // num_streams
    if per_stream >= 1 and sum(sorted(shard_ids)[:per_stream]) >= p:
        return "shard"
    return "label" if num_classes // num_streams >= p else "sample"


def _check_size(img_size) -> tuple[int, int]:
    if len(tuple(img_size)) != 2 or any(int(v) <= 0 for v in img_size):
        raise ValueError(f"img_size={img_size!r}: expected (H, W), e.g. (256, 128)")
    return int(img_size[0]), int(img_size[1])


def _round_robin(generators: list[Iterator]) -> Iterator:
    """What a DataLoader does with one generator per worker: one item from each in turn."""
    active = list(generators)
    while active:
        for gen in list(active):
            try:
                yield next(gen)
            except StopIteration:
                active.remove(gen)


class _IdentityPool:
    """Chunks of K samples per training label, drawn P distinct labels at a time."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng = k, rng
        self.chunks: dict[int, list[list[RawSample]]] = {}

    def add(self, label: int, samples: list[RawSample]) -> None:
        order = self.rng.permutation(len(samples))
        if len(order) < self.k:
            order = np.concatenate([order, self.rng.choice(len(samples), self.k - len(order))])
        chunks = [[samples[i] for i in order[j:j + self.k]] for j in range(0, len(order) - self.k + 1, self.k)]
        self.chunks.setdefault(label, []).extend(chunks)

    def num_ids(self) -> int:
        return len(self.chunks)

    def take(self, n: int) -> list[tuple[int, list[RawSample]]]:
        labels = sorted(self.chunks)
        picked = self.rng.choice(len(labels), size=min(n, len(labels)), replace=False)
        out = []
        for i in picked:
            label = labels[i]
            out.append((label, self.chunks[label].pop(0)))
            if not self.chunks[label]:
                del self.chunks[label]
        return out


class TrainStream(IterableDataset):
    """Infinite identity-balanced stream of global batches, cut to a fixed number per epoch; yields this
    rank's share of each. See the module doc."""

    def __init__(self, shards_dir, *, global_batch: int, num_instances: int, img_size, batches_per_epoch=None,
                 num_workers: int = 2, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1, start_batch: int = 0, augment: bool = True, aligned: bool = True,
                 epochs: int = 1, pool_factor: int = DataConfig.pool_factor):
        super().__init__()
        self.dir = ShardSource(shards_dir)   # a folder, URL or pipe: (stream/source.py)
        manifest = read_manifest(self.dir)
        train = manifest["splits"]["train"]
        if train["num_samples"] == 0:
            raise ValueError(f"{self.dir}/manifest.json: the train split has no samples")
        if num_instances < 1 or global_batch < num_instances or global_batch % num_instances:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                             f"num_instances={num_instances}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside 0..world_size-1 (world_size={world_size})")
        if accum < 1 or global_batch % (accum * world_size):
            raise ValueError(f"global_batch={global_batch} does not split evenly into accum={accum} micro steps "
                             f"x world_size={world_size} ranks")
        self.k, self.p, self.global_batch = num_instances, global_batch // num_instances, global_batch
        self.accum, self.micro = accum, global_batch // (accum * world_size)
        self.img_size = _check_size(img_size)
        self.num_batches = (batches_per_epoch if batches_per_epoch is not None
                            else max(1, train["num_samples"] // global_batch))
        if self.num_batches < 1:
            raise ValueError(f"batches_per_epoch={batches_per_epoch}: expected >= 1")
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.num_batches} (batches_per_epoch)")
        shards = [s for s in train["shards"] if s["num_samples"] > 0]
        self.shards = [s["name"] for s in shards]
        self.counts = {s["name"]: s["num_samples"] for s in shards}
        self.streams = max(1, num_workers)
        self.mode = split_mode([s.get("num_ids", 0) for s in shards], manifest["num_classes"], self.streams, self.p)
        if epochs < 1:
            raise ValueError(f"epochs={epochs}: expected >= 1")
        if pool_factor < 1:
            raise ValueError(f"pool_factor={pool_factor}: expected >= 1")
        self.pool_factor = pool_factor
        self.seed, self.epoch, self.rank, self.world, self.start = seed, epoch, rank, world_size, start_batch
        self.epochs = epochs
        self.augment, self.aligned = augment, aligned
        self.damage = Damage()

    def __len__(self) -> int:
        return self.epochs * self.num_batches - self.start

    def positions(self) -> list[int]:
        """This rank's positions in a global batch: its slice of each micro step, in micro order."""
        per_micro = self.global_batch // self.accum
        return [a * per_micro + self.rank * self.micro + i for a in range(self.accum) for i in range(self.micro)]

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # in-process: the same order a DataLoader with `streams` workers gives
            return _round_robin([self._physical(w) for w in range(self.streams)])
        if info.num_workers != self.streams:
            raise RuntimeError(f"TrainStream built for {self.streams} workers runs under {info.num_workers}")
        return self._physical(info.id)

    def _physical(self, worker: int) -> Iterator[dict]:
        """Epoch after epoch, the batches of the logical stream this worker runs in each: the DataLoader's round
        robin goes on across epochs, so after `done` batches worker w yields the epoch's batches
        start, start + 1, ... at its turns, those of logical stream (w - done + start) mod S."""
        transform = aug.TripletAugment(self.img_size, train=self.augment, aligned=self.aligned)
        done = 0
        for epoch in range(self.epoch, self.epoch + self.epochs):
            start = self.start if epoch == self.epoch else 0
            yield from self._epoch(epoch, (worker - done + start) % self.streams, start, transform)
            done += self.num_batches - start

    def _epoch(self, epoch: int, logical: int, start: int, transform: aug.TripletAugment) -> Iterator[dict]:
        batches = self._stream_batches(logical, epoch)
        for index in range(logical, self.num_batches, self.streams):
            for dropped in itertools.count():
                batch = next(batches)
                # A batch before start_batch is not decoded, but whether ANY of its samples decodes decides
                # whether the run being resumed dropped it, which moves every later batch of this stream.
                share = self._share(batch) if index >= start else (batch if self._any_decodes(batch) else None)
                if share is not None:
                    break
                if dropped >= MAX_DROPPED:
                    raise RuntimeError(f"{self.dir}: {MAX_DROPPED + 1} batches in a row hold no sample that "
                                       "decodes; the train shards are damaged (rebuild them with shards/build.py)")
            if index >= start:
                yield self._collate(share, epoch, index, transform)

    def _any_decodes(self, batch: list[RawSample]) -> bool:
        return any(self._try_decode(sample) is not None for sample in batch)

    def _try_decode(self, sample: RawSample) -> list | None:
        """The sample's decoded images, or None (noted as damage) when they do not decode."""
        try:
            return decode(sample)
        except ValueError as exn:
            self.damage.note(str(exn))
            return None

    def iter_pass(self, stream: int, pass_index: int, epoch: int | None = None) -> Iterator:
        """The samples logical `stream` reads in one pass of `epoch` (default: the first), _SHARD_END after
        each shard."""
        epoch = self.epoch if epoch is None else epoch
        sources = stream_sources(self.shards, seed=self.seed, epoch=epoch, pass_index=pass_index,
                                 stream=stream, num_streams=self.streams, shared=self.mode != "shard")
        for name, part, parts in sources:
            # remote: a shard that ends early without an error is damage too (a local one is as it was built)
            expected = self.counts[name] if self.dir.is_remote else None
            samples = iter_shard(self.dir, name, self.damage, expected=expected)
            for ordinal, sample in enumerate(samples):
                share = sample.meta["label"] if self.mode == "label" else ordinal
                if parts == 1 or share % parts == part:
                    yield sample
            yield _SHARD_END

    def _samples(self, stream: int, epoch: int) -> Iterator:
        for pass_index in itertools.count():
            yield from self.iter_pass(stream, pass_index, epoch)
            yield _PASS_END

    def _stream_batches(self, stream: int, epoch: int) -> Iterator[list[RawSample]]:
        """Global batches of one logical stream in `epoch`: P x K samples, identity-major, not yet decoded."""
        rng = np.random.default_rng([self.seed, epoch, stream, self.streams, 11])
        pool, group, label = _IdentityPool(self.k, rng), [], None
        threshold, emitted = self.pool_factor * self.p, 0
        for item in self._samples(stream, epoch):
            if isinstance(item, RawSample):
                if group and item.meta["label"] != label:
                    pool.add(label, group)
                    group = []
                    while pool.num_ids() >= threshold:
                        emitted += 1
                        yield [s for _, chunk in pool.take(self.p) for s in chunk]
                group.append(item)
                label = item.meta["label"]
                continue
            if group:
                pool.add(label, group)
                group = []
            while pool.num_ids() >= (threshold if item is _SHARD_END else self.p):
                emitted += 1
                yield [s for _, chunk in pool.take(self.p) for s in chunk]
            if item is _PASS_END:
                if emitted == 0:
                    raise RuntimeError(
                        f"{self.dir}: loader stream {stream} of {self.streams} holds only {pool.num_ids()} "
                        f"identities after a whole pass, but a batch needs P = global_batch / num_instances = "
                        f"{self.p}; use fewer data.num_workers, a smaller batch, or rebuild the shards with a "
                        "smaller --maxcount")
                emitted = 0

    def _share(self, batch: list[RawSample]) -> list[tuple[int, RawSample, list]] | None:
        """(global position, sample, decoded images) for this rank's positions. A sample that does not decode
        is replaced by the first that does among its chunk, then the rest of the batch; None when no
        sample of the batch decodes (every rank finds that, so all skip it together)."""
        cache: dict[str, list | None] = {}

        def load(q: int):
            sample = batch[q]
            if sample.key not in cache:
                cache[sample.key] = self._try_decode(sample)
            return cache[sample.key]

        share = []
        for q in self.positions():
            chunk = range(q - q % self.k, q - q % self.k + self.k)
            candidates = itertools.chain([q], chunk, (c for c in range(len(batch)) if c not in chunk))
            found = next((c for c in candidates if load(c) is not None), None)
            if found is None:
                self.damage.note(f"batch dropped: none of its {len(batch)} samples decodes")
                return None
            share.append((q, batch[found], load(found)))
        return share

    def _collate(self, share: list, epoch: int, index: int, transform: aug.TripletAugment) -> dict:
        # uint8 (B, 3 modalities, 3, H, W); the step normalises on the device and fills the erased blocks there
        images = _empty_batch((len(share), 3, 3, *self.img_size), torch.uint8)
        erase = []
        with torch.random.fork_rng(devices=[]):
            for row, (slot, (q, _, decoded)) in enumerate(zip(images, share)):
                torch.manual_seed(_sample_seed(self.seed, epoch, index, q))
                erase += [(row, *box) for box in transform.to_uint8(decoded, out=slot)]
        return {
            "images": images,
            "erase": erase,
            "labels": torch.tensor([s.meta["label"] for _, s, _ in share], dtype=torch.int64),
            "camids": torch.tensor([s.meta["camid"] for _, s, _ in share], dtype=torch.int64),
        }


def _sample_seed(seed: int, epoch: int, batch_index: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch_index, position]).generate_state(1)[0])


class EvalStream(IterableDataset):
    """Every sample of a split once across ranks, in equal full batches per rank."""

    def __init__(self, shards_dir, split: str, *, batch_size: int, img_size, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1):
        super().__init__()
        if split not in ("query", "gallery"):
            raise ValueError(f"split={split!r}: expected 'query' or 'gallery'")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and rank={rank} in 0..{world_size - 1}")
        self.dir = ShardSource(shards_dir)   # a folder, URL or pipe: (stream/source.py)
        entry = read_manifest(self.dir)["splits"][split]
        self.shards = [(s["name"], s["num_samples"]) for s in entry["shards"]]
        total = sum(n for _, n in self.shards)
        if total == 0:
            raise ValueError(f"{self.dir}/manifest.json: split {split!r} has no samples")
        self.img_size = _check_size(img_size)
        start, stop = rank * total // world_size, (rank + 1) * total // world_size
        per_rank = math.ceil(math.ceil(total / world_size) / batch_size)
        pad = start if stop > start else 0
        slots = [(p, True) for p in range(start, stop)] + [(pad, False)] * (per_rank * batch_size - (stop - start))
        self.batches = [slots[i * batch_size:(i + 1) * batch_size] for i in range(per_rank)]
        self.streams = max(1, num_workers)
        self.damage = Damage()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return _round_robin([self._worker(w) for w in range(self.streams)])
        return self._worker(info.id)

    def _worker(self, worker: int) -> Iterator[dict]:
        n = len(self.batches)
        batches = self.batches[worker * n // self.streams:(worker + 1) * n // self.streams]
        if not batches:
            return
        transform = aug.TripletAugment(self.img_size, train=False)
        repeated = {p for b in batches for p, valid in b if not valid}
        found = self._read({p for b in batches for p, _ in b}, transform)
        cache: dict[int, tuple] = {}
        for batch in batches:
            for pos, _ in batch:
                while pos not in cache:
                    got, item = next(found)
                    cache[got] = item
            items = [cache[p] for p, _ in batch]
            # padding repeats a position: if that sample is damaged, its repeats hold the blank stand-in too
            yield {
                "images": default_collate([it[0] for it in items]),
                "pids": torch.tensor([it[1] for it in items], dtype=torch.int64),
                "camids": torch.tensor([it[2] for it in items], dtype=torch.int64),
                "sceneids": torch.tensor([it[3] for it in items], dtype=torch.int64),
                "index": torch.tensor([p for p, _ in batch], dtype=torch.int64),
                "valid": torch.tensor([v and it[4] for (_, v), it in zip(batch, items)], dtype=torch.bool),
                "damaged": torch.tensor([v and not it[4] for (_, v), it in zip(batch, items)], dtype=torch.bool),
            }
            for pos, _ in batch:
                if pos not in repeated:
                    cache.pop(pos, None)

    def _read(self, needed: set[int], transform) -> Iterator[tuple[int, tuple]]:
        """(position, (image, pid, camid, sceneid, ok)) for every needed position, ascending."""
        offset = 0
        for name, count in self.shards:
            wanted = sorted(p for p in needed if offset <= p < offset + count)
            if wanted:
                seen = set()
                samples = iter_shard(self.dir, name, self.damage, with_damaged=True)
                for ordinal, sample in enumerate(samples):
                    pos = offset + ordinal
                    if pos > wanted[-1]:
                        break
                    if pos in needed:
                        seen.add(pos)
                        yield pos, self._prepare(sample, transform)
                for pos in wanted:
                    if pos not in seen:
                        self.damage.note(f"shard {name}: sample {pos - offset} of {count} missing (shard cut short?)")
                        yield pos, self._invalid()
            offset += count

    def _prepare(self, sample: RawSample | None, transform) -> tuple:
        if sample is None:
            return self._invalid()
        try:
            images = transform(decode(sample))
        except ValueError as exn:
            self.damage.note(str(exn))
            return self._invalid()
        meta = sample.meta
        return images, meta["pid"], meta["camid"], meta.get("sceneid", -1), True

    def _invalid(self) -> tuple:
        # camid 0, not -1: the stand-in row goes through the model (SIE looks the camera up) and is dropped after
        return torch.zeros(3, 3, *self.img_size), -1, 0, -1, False

    def shard_of(self, position: int) -> str:
        """The shard (file name) that holds `position` of the split."""
        offset = 0
        for name, count in self.shards:
            if position < offset + count:
                return name
            offset += count
        raise IndexError(f"position {position} outside the split's {offset} samples")


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch tensor; inside a DataLoader worker it is allocated in shared memory, as default_collate
    does, so handing it to the main process costs no copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    storage = empty.untyped_storage()._new_shared(math.prod(shape) * empty.element_size())
    return empty.set_(storage).view(shape)


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
