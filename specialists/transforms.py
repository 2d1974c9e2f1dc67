"""Batch transforms on the device: resize, random crop with padding, optional flip, normalise.

Images stay uint8 (B, H, W, C) until they reach the device; augmenting whole batches with tensor
ops is much faster than per-image PIL transforms for the small inputs this project targets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .records import GeneralistRecord

__all__ = ["BatchTransform", "make_transforms", "resize_images"]


class BatchTransform:
    """uint8 (B, H, W, C) -> normalised float (B, C, S, S)."""

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        input_size: int,
        augment: bool = False,
        hflip: bool = False,
        pad: int | None = None,
    ) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.input_size = input_size
        self.augment = augment
        self.hflip = hflip
        self.pad = max(1, input_size // 8) if pad is None else pad
        self._on: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, h, w, c = x.shape
        size = self.input_size
        if h == size and w == size and not self.augment:
            # the common case at inference: one conversion into a float tensor in the images'
            # own (channels-last) layout, then one scale and one shift in place
            out = torch.empty((b, h, w, c), dtype=torch.float32, device=x.device)
            out = out.permute(0, 3, 1, 2).copy_(x.permute(0, 3, 1, 2))
            scale, shift = self._affine(x.device)
            return out.mul_(scale).add_(shift)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W)
        if h != size or w != size:
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.augment:
            x = self._random_crop(x, generator)
            if self.hflip:
                flip = torch.rand(x.shape[0], generator=generator) < 0.5
                x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) scale and shift on ``device`` taking uint8 values to normalised ones:
        (v / 255 - mean) / std = v scale + shift."""
        if self._on is None or self._on[0].device != device:
            scale = 1.0 / (255.0 * self.std.double())
            shift = -self.mean.double() / self.std.double()
            self._on = (scale.float().to(device), shift.float().to(device))
        return self._on

    def _random_crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p), mode="replicate")
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return xp[bi, ci, rows, cols]


def make_transforms(record: GeneralistRecord) -> tuple[BatchTransform, BatchTransform]:
    """(train, eval) transforms of a generalist record."""
    train = BatchTransform(
        record.mean, record.std, record.input_size, augment=True, hflip=record.hflip
    )
    return train, BatchTransform(record.mean, record.std, record.input_size)


def resize_images(images: np.ndarray, size: int, channels: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) images at ``size`` x ``size`` (bilinear, antialiased) and, if given,
    ``channels`` (RGB to gray by the mean of the channels, gray to RGB by repetition)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if channels is not None and x.shape[-1] != channels:
        if channels == 1:
            x = x.float().mean(-1, keepdim=True).round().to(torch.uint8)
        else:
            x = x[..., :1].expand(*x.shape[:-1], channels)
    if x.shape[1] != size or x.shape[2] != size:
        t = x.permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        x = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.contiguous().numpy()
