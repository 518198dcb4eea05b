"""The evaluation stream: every sample of a split once across ranks, in equal full batches per rank, damaged
samples kept as blank rows (stream/pipeline.py describes the layout)."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from mfrnet_ds.stream import augment as aug
from mfrnet_ds.stream.reader import Damage, RawSample, decode, iter_shard, read_manifest
from mfrnet_ds.stream.source import ShardSource
from mfrnet_ds.stream.workers import check_size, round_robin


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
        self.img_size = check_size(img_size)
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
            return round_robin([self._worker(w) for w in range(self.streams)])
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
