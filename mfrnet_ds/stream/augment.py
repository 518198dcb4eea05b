"""Augmentation of one sample's three aligned images with ONE random draw (torchvision.transforms.v2).

The three modalities are pixel aligned, so a flip, crop or erased block must land at the same pixels
in all of them (the reference draws them independently per modality). v2 transforms draw their
parameters once per call and apply them to every leading (batch) index of an Image, so the sample is
passed as one `tv_tensors.Image` of shape (3 modalities, 3, H, W). Random numbers come from torch's
global generator; the loader seeds it per batch so a batch's draws are reproducible.

Recipe (the reference's): resize to the dataset size, horizontal flip 0.5, pad 10 + random crop,
scale to [0, 1] and normalise with mean 0.5 std 0.5, random erasing 0.5 filled with normal noise.
For speed the geometric steps run on uint8 (exact: they only move pixels, and the padding is 0 as
before scaling). Training batches leave the loader as uint8 (`TripletAugment.to_uint8`: a quarter of float32's
bytes through shared memory, pinned memory and PCIe) with the erased blocks as a list of boxes; the train step
normalises on the device and fills the boxes there (`erase_`). The float path (`__call__`, evaluation and tests)
draws the same boxes and fills them the same way on the host.
"""
from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PAD = 10


ERASE_SCALE = (0.02, 0.33)   # random erasing (Zhong et al.), torchvision's defaults: share of the image area
ERASE_RATIO = (0.3, 3.3)     # aspect ratio h / w, log-uniform
ERASE_TRIES = 10             # draws that must fit inside the image, else nothing is erased

# One erased block: (modality, or -1 for all three; top, left, height, width; the seed of its noise)
Box = tuple[int, int, int, int, int, int]


class TripletAugment:
    """uint8 (3, h, w) images of one sample, in modality order -> (3, 3, H, W): float32 normalised (`__call__`)
    or uint8 plus the blocks to erase (`to_uint8`).

    train=False: resize and normalise only. aligned=False: one draw per image, as the reference does.
    """

    def __init__(self, img_size: tuple[int, int], *, train: bool = True, aligned: bool = True,
                 flip_p: float = 0.5, pad: int = PAD, erase_p: float = 0.5):
        self.size = (int(img_size[0]), int(img_size[1]))
        resize = v2.Resize(self.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        steps = [resize, v2.RandomHorizontalFlip(flip_p), v2.RandomCrop(self.size, padding=pad)] if train else [resize]
        self.geometry = v2.Compose(steps)
        self.erase_p = erase_p if train else 0.0
        self.aligned = aligned

    def __call__(self, images: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(3, 3, *self.size)
        moved = torch.empty(3, 3, *self.size, dtype=torch.uint8)
        boxes = self.to_uint8(images, moved)
        torch.mul(moved, 1 / 127.5, out=out)  # uint8 -> float in one pass
        out.sub_(1.0)  # x / 127.5 - 1 == Normalize(MEAN, STD) of x / 255
        erase_(out.unsqueeze(0), [(0, *box) for box in boxes])
        return out

    def to_uint8(self, images: list[torch.Tensor], out: torch.Tensor) -> list[Box]:
        """The flipped, padded and cropped images into `out` (uint8 (3, 3, H, W)); returns the blocks to erase.
        Draws from torch's global generator: geometry first, then erasing (the loader seeds it per sample)."""
        if self.aligned:
            if len({tuple(image.shape) for image in images}) > 1:
                # Modalities stored at different sizes: one grid first (no randomness in this step).
                images = [v2.functional.resize(image, list(self.size), antialias=True) for image in images]
            out.copy_(self.geometry(tv_tensors.Image(torch.stack(images))))  # one draw for all three
        else:
            for slot, image in zip(out, images):
                slot.copy_(self.geometry(tv_tensors.Image(image)))
        if self.erase_p <= 0:
            return []
        modalities = [-1] if self.aligned else [0, 1, 2]   # one block for all three, or one each
        return [(m, *box) for m in modalities if (box := draw_erase_box(*self.size, self.erase_p)) is not None]


def draw_erase_box(height: int, width: int, p: float) -> tuple[int, int, int, int, int] | None:
    """With probability p, a block of ERASE_SCALE of the image area with a log-uniform ERASE_RATIO that fits in
    the image (ERASE_TRIES draws, else none), and a seed for its noise: (top, left, h, w, seed)."""
    if torch.rand(()) >= p:
        return None
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(ERASE_TRIES):
        area = height * width * float(torch.empty(()).uniform_(*ERASE_SCALE))
        ratio = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w, int(torch.randint(0, 2 ** 62, ()))
    return None


def erase_(images: torch.Tensor, boxes: list[tuple[int, ...]]) -> torch.Tensor:
    """Fill each (row, modality, top, left, h, w, seed) block of normalised `images` (N, 3, 3, H, W) with
    standard normal noise drawn from the block's own seed on the images' device, in place. modality -1: the
    same noise in all three (aligned). Reads no tensor: the boxes are host ints, so on a GPU this is launches
    only. The noise is the same for a sample whatever the world size (the seed travels with the box)."""
    for row, modality, top, left, h, w, seed in boxes:
        g = torch.Generator(images.device).manual_seed(seed)
        noise = torch.randn((3, h, w), generator=g, device=images.device)
        block = images[row, :, :, top:top + h, left:left + w] if modality < 0 else \
            images[row, modality, :, top:top + h, left:left + w]
        block.copy_(noise)   # (3, h, w) broadcast over the modalities when all three share it
    return images
