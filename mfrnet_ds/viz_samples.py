"""Which samples of a split the expert picture draws: read with the evaluation loader, spread over
identities and cameras (mfrnet_ds.viz)."""
from __future__ import annotations

import torch


def take_samples(shards, split: str, n: int, img_size) -> dict[str, torch.Tensor]:
    """The first n valid samples of a split, read with the evaluation loader (no workers)."""
    return read_split(shards, split, img_size, stop=n, batch_size=n)


def read_split(shards, split: str, img_size, *, stop: int, batch_size: int = 32, keep_images=None):
    """Valid samples 0..stop-1 of a split: pids, camids, split positions, and images (all, or those at the
    positions in `keep_images`)."""
    from mfrnet_ds.stream.pipeline import eval_loader

    if stop < 1:
        raise ValueError(f"n={stop}: expected >= 1")
    keep: dict[str, list[torch.Tensor]] = {"images": [], "pids": [], "camids": [], "position": []}
    got = 0
    for batch in eval_loader(shards, split, batch_size=batch_size, img_size=img_size, num_workers=0):
        valid = batch["valid"]
        position = torch.arange(got, got + int(valid.sum()))
        images = batch["images"][valid]
        if keep_images is not None:
            wanted = torch.tensor([int(p) in keep_images for p in position], dtype=torch.bool)
            images = images[wanted]
        keep["images"].append(images)
        keep["pids"].append(batch["pids"][valid])
        keep["camids"].append(batch["camids"][valid])
        keep["position"].append(position)
        got += int(valid.sum())
        if got >= stop:
            break
    if got == 0:
        raise ValueError(f"{shards}: split {split!r} has no readable sample")
    out = {key: torch.cat(parts) for key, parts in keep.items()}
    return {k: v if k == "images" and keep_images is not None else v[:stop] for k, v in out.items()}


def spread_samples(pids: list[int], cams: list[int], n: int) -> list[int]:
    """Positions of n samples covering as many identities and cameras as there are: each pick prefers a new
    identity, then the camera picked least so far, then a new (identity, camera) pair, then split order."""
    chosen: list[int] = []
    seen_pid, seen_pair, per_cam = set(), set(), {c: 0 for c in cams}
    while len(chosen) < min(n, len(pids)):
        best = min((i for i in range(len(pids)) if i not in chosen),
                   key=lambda i: (pids[i] in seen_pid, per_cam[cams[i]], (pids[i], cams[i]) in seen_pair, i))
        chosen.append(best)
        seen_pid.add(pids[best])
        seen_pair.add((pids[best], cams[best]))
        per_cam[cams[best]] += 1
    return sorted(chosen)
