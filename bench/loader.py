"""Training-loader throughput: the streaming loader against a folder-of-JPEG loader like the reference's.

    python bench/loader.py [--ids 48] [--workers 0 1 2] [--batches 12] [--repeats 3]

Same synthetic RGBNT201-layout data for all, same P x K batches, same augmentation recipe (resize,
flip 0.5, pad 10 + crop, normalise, erasing 0.5). Loaders:
  folder-pil      the reference's way: a map-style dataset opening three JPEG files per sample with
                  PIL and running torchvision's transforms on each image separately, P x K sampler
  folder-tensor   the same files, decoded with torchvision.io and augmented like the stream (one v2
                  call on the stacked triplet): separates what the format gives from what the
                  augmentation code gives
  stream          mfrnet_ds.stream.pipeline.train_loader over the shards
samples/s: wall clock after the first batch (worker start-up excluded). samples/cpu-s: samples per
CPU second of the main process and its workers over the whole run, which holds up when other jobs
share the machine. Median over repeats; the loaders take turns within each repeat so that load from
elsewhere falls on all of them alike. torch runs one thread per process (as in DataLoader workers).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mfrnet_ds.raw import read_raw
from mfrnet_ds.shards import build
from mfrnet_ds.stream import augment as aug
from mfrnet_ds.stream.pipeline import train_loader
from mfrnet_ds.stream.reader import RawSample, decode
from mfrnet_ds.synth import make_tree

SIZE = (256, 128)


class IdentitySampler(Sampler):
    """P x K indices per batch, identities drawn at random (the reference's RandomIdentitySampler)."""

    def __init__(self, pids: list[int], k: int, num_batches: int, p: int, seed: int = 0):
        self.by_pid: dict[int, list[int]] = {}
        for i, pid in enumerate(pids):
            self.by_pid.setdefault(pid, []).append(i)
        self.k, self.p, self.num_batches, self.seed = k, p, num_batches, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        pids = sorted(self.by_pid)
        for _ in range(self.num_batches):
            for pid in rng.choice(pids, self.p, replace=False):
                yield from rng.choice(self.by_pid[pid], self.k, replace=len(self.by_pid[pid]) < self.k).tolist()

    def __len__(self):
        return self.num_batches * self.p * self.k


class FolderDataset(Dataset):
    def __init__(self, root: Path, tensor_path: bool):
        raw = read_raw("rgbnt201", root)
        self.root, self.records, self.tensor_path = root, raw.records("train"), tensor_path
        self.pil_transform = T.Compose([
            T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5), T.Pad(10),
            T.RandomCrop(SIZE), T.ToTensor(), T.Normalize(aug.MEAN, aug.STD), T.RandomErasing(0.5, value="random"),
        ])
        self.triplet_transform = aug.TripletAugment(SIZE)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if self.tensor_path:
            data = tuple((self.root / f).read_bytes() for f in record.files)
            images = self.triplet_transform(decode(RawSample(record.key, "-", {}, data)))
        else:
            images = torch.stack([self.pil_transform(Image.open(self.root / f).convert("RGB")) for f in record.files])
        return {"images": images, "labels": record.label, "camids": record.camid}


def folder_loader(root: Path, tensor_path: bool, batch: int, k: int, num_batches: int, workers: int) -> DataLoader:
    dataset = FolderDataset(root, tensor_path)
    sampler = IdentitySampler([r.pid for r in dataset.records], k, num_batches, batch // k)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(loader) -> tuple[float, float]:
    """(samples/s after the first batch, samples per CPU second of the whole run incl. workers)."""
    cpu0 = _cpu_seconds()
    iterator = iter(loader)
    first = next(iterator)["images"].shape[0]
    start, samples = time.perf_counter(), 0
    for item in iterator:
        samples += item["images"].shape[0]
    wall = time.perf_counter() - start
    del iterator  # workers exit and are joined, so their CPU time is counted
    return samples / wall, (samples + first) / (_cpu_seconds() - cpu0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=48, help="identities of the synthetic tree (half train)")
    parser.add_argument("--per-cam", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per run (after the first)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="keep data here instead of a temporary folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        root, shards = work / "raw", work / "shards"
        if not (root / "train_171").is_dir():
            make_tree("rgbnt201", root, ids=args.ids, cams=4, per_cam=args.per_cam, seed=0)
        manifest = build("rgbnt201", root, shards, maxcount=128)
        train = manifest["splits"]["train"]
        print(f"data: synthetic rgbnt201, {train['num_samples']} train triplets ({train['num_ids']} ids, "
              f"{len(train['shards'])} shards), JPEG {SIZE[0]}x{SIZE[1]} per modality; batch {args.batch} = "
              f"{args.batch // args.instances} ids x {args.instances}; {args.batches} timed batches x "
              f"{args.repeats} repeats; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        n = args.batches + 1
        makers = {
            "folder-pil": lambda w: folder_loader(root, False, args.batch, args.instances, n, w),
            "folder-tensor": lambda w: folder_loader(root, True, args.batch, args.instances, n, w),
            "stream": lambda w: train_loader(shards, global_batch=args.batch, num_instances=args.instances, img_size=SIZE,
                                             batches_per_epoch=n, num_workers=w),
        }
        rows = []
        for workers in args.workers:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in makers}
            for _ in range(args.repeats):
                for name, make in makers.items():
                    runs[name].append(measure(make(workers)))
            wall = {name: statistics.median(r[0] for r in runs[name]) for name in makers}
            cpu = {name: statistics.median(r[1] for r in runs[name]) for name in makers}
            for name in makers:
                rows.append((name, workers, wall[name], wall[name] / wall["folder-pil"],
                             cpu[name], cpu[name] / cpu["folder-pil"]))
    print()
    print("| loader | workers | samples/s | vs folder-pil | samples/cpu-s | vs folder-pil |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, workers, rate, ratio, cpu_rate, cpu_ratio in rows:
        print(f"| {name} | {workers} | {rate:.0f} | {ratio:.2f}x | {cpu_rate:.0f} | {cpu_ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
