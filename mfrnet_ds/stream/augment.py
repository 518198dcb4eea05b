"""Augmentation of one sample's three aligned images with ONE random draw (torchvision.transforms.v2).

The three modalities are pixel aligned, so a flip, crop or erased block must land at the same pixels
in all of them (the reference draws them independently per modality). v2 transforms draw their
parameters once per call and apply them to every leading (batch) index of an Image, so the sample is
passed as one `tv_tensors.Image` of shape (3 modalities, 3, H, W). Random numbers come from torch's
global generator; the loader seeds it per batch so a batch's draws are reproducible.

Recipe (the reference's): resize to the dataset size, horizontal flip 0.5, pad 10 + random crop,
scale to [0, 1] and normalise with mean 0.5 std 0.5, random erasing 0.5 filled with normal noise.
For speed the geometric steps run on uint8 (exact: they only move pixels, and the padding is 0 as
before scaling), and scaling + normalising is one in-place step into the caller's batch tensor, so a
sample never exists as separate float temporaries.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PAD = 10


class TripletAugment:
    """uint8 (3, h, w) images of one sample, in modality order -> float32 (3, 3, H, W).

    train=False: resize and normalise only. aligned=False: one draw per image, as the reference does.
    """

    def __init__(self, img_size: tuple[int, int], *, train: bool = True, aligned: bool = True,
                 flip_p: float = 0.5, pad: int = PAD, erase_p: float = 0.5):
        self.size = (int(img_size[0]), int(img_size[1]))
        resize = v2.Resize(self.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        steps = [resize, v2.RandomHorizontalFlip(flip_p), v2.RandomCrop(self.size, padding=pad)] if train else [resize]
        self.geometry = v2.Compose(steps)
        self.erase = v2.RandomErasing(erase_p, value="random", inplace=True) if train and erase_p > 0 else None
        self.aligned = aligned

    def __call__(self, images: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(3, 3, *self.size)
        if self.aligned:
            if len({tuple(image.shape) for image in images}) > 1:
                # Modalities stored at different sizes: one grid first (no randomness in this step).
                images = [v2.functional.resize(image, list(self.size), antialias=True) for image in images]
            moved = self.geometry(tv_tensors.Image(torch.stack(images)))  # one draw for all three
        else:
            moved = torch.stack([self.geometry(tv_tensors.Image(image)) for image in images])
        torch.mul(moved.as_subclass(torch.Tensor), 1 / 127.5, out=out)  # uint8 -> float in one pass
        out.sub_(1.0)  # x / 127.5 - 1 == Normalize(MEAN, STD) of x / 255
        if self.erase is not None:
            if self.aligned:
                self.erase(tv_tensors.Image(out))  # in place, one block for all three
            else:
                for modality in out:
                    self.erase(tv_tensors.Image(modality))
        return out
