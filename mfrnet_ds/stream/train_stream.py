"""The training stream: identity-balanced P x K global batches, every rank drawing the same and decoding only its
share. The design (streams, passes, shares, damage, seeds) is described in stream/pipeline.py."""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mfrnet_ds.config import DataConfig
from mfrnet_ds.stream import augment as aug
from mfrnet_ds.stream.reader import Damage, RawSample, decode, iter_shard, read_manifest
from mfrnet_ds.stream.source import ShardSource
from mfrnet_ds.stream.workers import check_size, empty_batch, round_robin

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
        self.img_size = check_size(img_size)
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
            return round_robin([self._physical(w) for w in range(self.streams)])
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
        images = empty_batch((len(share), 3, 3, *self.img_size), torch.uint8)
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
