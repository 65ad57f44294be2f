"""Batched augmentations with random parameters drawn per sample, on whatever device the batch lives.

The recipes follow the authors' code (paper.md §6) and BYOL's ImageNet recipe. Every random parameter (crop box,
flip, jitter factors and their order, grayscale, blur sigma, solarisation) is drawn independently for every sample
from an explicit ``torch.Generator``; nothing is shared by a batch. The colour operations reproduce
``torchvision.transforms.v2.functional`` on float images (tests compare them sample by sample); the crop uses
``torchvision.ops.roi_align`` (bilinear with adaptive sampling, i.e. antialiased when shrinking) so the whole batch
is cropped and resized in one call.

Over 300 lines: the recipes and the batched ops whose per-sample parameters they draw belong together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the authors' code
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation distribution of one view."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 0  # odd kernel size; 0 = 10% of the image size, made odd
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] | None = CIFAR_MEAN
    std: tuple[float, float, float] | None = CIFAR_STD


def recipe(name: str, size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """The two view distributions of a named recipe.

    * ``cifar``: the authors' CIFAR-10 recipe: RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8,
      grayscale p=0.2, CIFAR normalisation, no blur.
    * ``stl10``: the authors' STL-10 recipe: RandomResizedCrop, flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8,
      grayscale p=0.2, Gaussian blur (kernel 10% of the size, sigma in [0.1, 2]) always, no normalisation.
    * ``imagenet``: BYOL's recipe: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=1.0 / 0.1,
      solarisation p=0 / 0.2, ImageNet normalisation.
    """
    if name == "cifar":
        v = ViewRecipe(size=size)
        return v, v
    if name == "stl10":
        v = ViewRecipe(size=size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=1.0,
                       mean=None, std=None)
        return v, v
    if name == "imagenet":
        v1 = ViewRecipe(size=size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_p=1.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return v1, replace(v1, blur_p=0.1, solarize_p=0.2)
    raise ValueError(f"unknown augmentation recipe {name!r}; use cifar, stl10 or imagenet")


# ----------------------------------------------------------------------------------------------------------------
# Colour operations on float images (B, 3, H, W) in [0, 1], with per-sample factors (B,)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's ``rgb_to_grayscale``: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bcast(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_bcast(f) * x + (1 - _bcast(f)) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (_bcast(f) * x + (1 - _bcast(f)) * grayscale(x)).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(-1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # (B, 3, 6, H, W)
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), a4)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Shift the hue by ``f`` (in [-0.5, 0.5]) per sample, as torchvision's ``adjust_hue``."""
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur (separable, reflect padding, as torchvision's ``gaussian_blur``)."""
    B, C, H, W = x.shape
    half = (kernel - 1) * 0.5
    pos = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, k)
    k = k.repeat_interleave(C, 0)  # (B*C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, kernel), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, kernel, 1), groups=B * C)
    return y.view(B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Crops


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes ``(x0, y0, x1, y1)`` in pixels (n, 4), torchvision's algorithm.

    Ten attempts per sample of area fraction ~ U(scale) and log-aspect ~ U(log ratio); the first that fits wins;
    samples with no fit fall back to the central crop clamped to the ratio range.
    """
    attempts = 10
    area = height * width
    u = torch.rand(n, attempts, 3, generator=generator)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0)
    w_sel = w.gather(1, idx[:, None]).squeeze(1)
    h_sel = h.gather(1, idx[:, None]).squeeze(1)
    # Offsets: torch.randint(0, H - h + 1) in torchvision; same distribution from a uniform draw.
    v = torch.rand(n, 2, generator=generator)
    y0 = torch.floor(v[:, 0] * (height - h_sel + 1))
    x0 = torch.floor(v[:, 1] * (width - w_sel + 1))
    # Fallback: central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    fail = first < 0
    w_sel = torch.where(fail, torch.full_like(w_sel, fw), w_sel)
    h_sel = torch.where(fail, torch.full_like(h_sel, fh), h_sel)
    x0 = torch.where(fail, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(fail, torch.full_like(y0, (height - fh) // 2), y0)
    return torch.stack([x0, y0, x0 + w_sel, y0 + h_sel], 1).to(device)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop every image to its box (n, 4) and resize to ``size`` x ``size`` (bilinear, antialiased by
    adaptive sampling)."""
    idx = torch.arange(x.shape[0], device=x.device, dtype=x.dtype).view(-1, 1)
    rois = torch.cat([idx, boxes.to(x.dtype)], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ----------------------------------------------------------------------------------------------------------------


def augment_view(images: torch.Tensor, r: ViewRecipe, generator: torch.Generator | None = None, *,
                 shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One augmented view of a uint8 batch (B, H, W, 3) or (B, 3, H, W): float (B, 3, size, size), normalised.

    Random draws come from ``generator`` on the CPU (so results do not depend on the device) and are moved to the
    batch's device; the image maths runs there. With ``shard=(rank, world)`` the batch is rank's slice of a global
    batch of ``B * world`` images: draws are made for the whole global batch and sliced, so N processes augment
    exactly as one process does on the global batch.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, H, W, 3), got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    dev = images.device
    x = images.float().div_(255.0)
    B, _, H, W = x.shape
    g = generator
    rank, world = shard
    n, lo = B * world, B * rank

    def draw(*shape: int) -> torch.Tensor:  # uniform draws for the global batch, this shard's rows
        return torch.rand(n, *shape, generator=g)[lo: lo + B].to(dev)

    boxes = crop_boxes(n, H, W, r.crop_scale, r.crop_ratio, g, dev)[lo: lo + B]
    x = resized_crop(x, boxes, r.size).clamp_(0, 1)

    u = draw(8)
    factors, order_keys, sigma_u = draw(4), draw(4), draw(1).flatten()
    flip = u[:, 0] < r.flip_p
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    jitter = (u[:, 1] < r.jitter_p).nonzero().flatten()
    if len(jitter):
        order = torch.argsort(order_keys, 1)  # torchvision applies the four in a random order
        lows = torch.tensor([max(0.0, 1 - r.brightness), max(0.0, 1 - r.contrast), max(0.0, 1 - r.saturation),
                             -r.hue], device=dev)
        highs = torch.tensor([1 + r.brightness, 1 + r.contrast, 1 + r.saturation, r.hue], device=dev)
        factors = lows + (highs - lows) * factors
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        strengths = (r.brightness, r.contrast, r.saturation, r.hue)
        for stage in range(4):
            for op_id, op in enumerate(ops):
                if strengths[op_id] == 0:
                    continue
                sel = jitter[order[jitter, stage] == op_id]
                if len(sel):
                    x[sel] = op(x[sel], factors[sel, op_id])

    gray = u[:, 2] < r.gray_p
    if gray.any():
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)

    if r.blur_p > 0:
        kernel = r.blur_kernel or int(0.1 * r.size)
        kernel += 1 - kernel % 2  # odd
        sigma = r.blur_sigma[0] + (r.blur_sigma[1] - r.blur_sigma[0]) * sigma_u
        blur = (u[:, 3] < r.blur_p).nonzero().flatten()
        if len(blur) and kernel > 1:
            x[blur] = gaussian_blur(x[blur], kernel, sigma[blur])

    if r.solarize_p > 0:
        sol = (u[:, 4] < r.solarize_p).view(-1, 1, 1, 1)
        x = torch.where(sol & (x >= 0.5), 1.0 - x, x)

    if r.mean is not None and r.std is not None:
        mean = torch.tensor(r.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(r.std, device=dev).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def eval_transform(images: torch.Tensor, r: ViewRecipe) -> torch.Tensor:
    """The deterministic test-time transform: uint8 (B, H, W, 3) -> float (B, 3, H, W), normalised like training.

    Images already at the recipe's size are only normalised (CIFAR, STL-10); others are resized (bilinear).
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0) if images.shape[-1] == 3 else images.float() / 255.0
    if x.shape[-1] != r.size or x.shape[-2] != r.size:
        x = F.interpolate(x, size=(r.size, r.size), mode="bilinear", antialias=True, align_corners=False)
    if r.mean is not None and r.std is not None:
        x = (x - torch.tensor(r.mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
            r.std, device=x.device).view(1, 3, 1, 1)
    return x


class TwoViewAugment:
    """Callable producing the two augmented views of a uint8 batch.

    Examples:
        >>> aug = TwoViewAugment(*recipe("cifar", 32))
        >>> x1, x2 = aug(torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
    """

    def __init__(self, view1: ViewRecipe, view2: ViewRecipe) -> None:
        self.view1, self.view2 = view1, view2

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                 shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        return (augment_view(images, self.view1, generator, shard=shard),
                augment_view(images, self.view2, generator, shard=shard))
