"""Batched augmentations with random parameters drawn per sample, on whatever device the batch lives.

The recipes follow the authors' code (paper.md §6) and BYOL's ImageNet recipe. What is ours is the draw: every
random parameter (crop box, flip, jitter factors and their order, grayscale, blur sigma, solarisation) is drawn
independently for every sample from an explicit ``torch.Generator`` (:func:`draw_view_params`), the same under any
sharding of the batch, and kept on the CPU: which samples get which operation is decided there, and only the index
and factor tensors go to the batch's device, copied without waiting for it. (A device mask read on the host, by
``nonzero()`` or ``if mask.any()``, or a blocking copy, stalls the host until the device has finished all queued
work: 56 to 61 times per two-view call before, none now; ``benchmarks/augment_syncs.py`` counts them.) The image
operations that apply them are library code: ``torchvision.ops.roi_align`` crops and resizes the whole batch in one
call (bilinear with adaptive sampling, i.e. antialiased when shrinking), and kornia's colour, blur and solarisation
ops take one factor per sample (:func:`apply_view_params`). Tests compare
everything after the crop, sample by sample, with ``torchvision.transforms.v2.functional`` applied with the same
parameters. The crop itself resamples differently from torchvision's ``resized_crop`` (see :func:`resized_crop`).

Over 300 lines: the recipes, their parameter draw and its application belong together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import kornia.color as KC
import kornia.enhance as KE
import kornia.filters as KF
import torch
import torchvision.transforms.v2.functional as TF
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
    * ``imagenet``: BYOL's distributions (BYOL paper, Appendix B): colour jitter of strengths (0.4, 0.4, 0.2,
      0.1) p=0.8 with the four operations in a random order per sample, grayscale p=0.2, blur p=1.0 / 0.1
      (kernel 10 % of the size made odd, 23 px at 224; sigma in [0.1, 2]), solarisation at 0.5 p=0 / 0.2,
      ImageNet normalisation. The operations that apply them follow torchvision's ``ColorJitter`` and
      ``GaussianBlur`` conventions, not BYOL's code: brightness multiplies by a factor in [0.6, 1.4] (BYOL adds
      a delta in [-0.4, 0.4]); contrast scales around the mean of the grayscale image (BYOL: around each
      channel's own mean); saturation blends with the grayscale image (BYOL: scales S in HSV); the blur pads by
      reflection (BYOL: zero padding, 'SAME'). The hue shift (in HSV) and the solarisation are as BYOL's. So this
      is BYOL's recipe in its parameters and probabilities, not pixel for pixel.
    """
    if name == "cifar":
        v = ViewRecipe(size=size)
        return v, v
    if name == "stl10":
        v = ViewRecipe(
            size=size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=1.0, mean=None, std=None
        )
        return v, v
    if name == "imagenet":
        v1 = ViewRecipe(
            size=size,
            brightness=0.4,
            contrast=0.4,
            saturation=0.2,
            hue=0.1,
            blur_p=1.0,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        return v1, replace(v1, blur_p=0.1, solarize_p=0.2)
    raise ValueError(f"unknown augmentation recipe {name!r}; use cifar, stl10 or imagenet")


# ----------------------------------------------------------------------------------------------------------------
# Colour jitter with per-sample factors and order (kornia's ops, torchvision's conventions)


def _adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return KE.adjust_hue(x, f * (2 * math.pi))  # torchvision's hue factor is in turns, kornia's in radians


#: ColorJitter's four operations in torchvision's parameter order (brightness, contrast, saturation, hue); each
#: takes a float batch (B, 3, H, W) in [0, 1] and one factor per sample (B,) in torchvision's units.
JITTER_OPS = (
    KE.adjust_brightness_accumulative,
    KE.adjust_contrast_with_mean_subtraction,
    KE.adjust_saturation_with_gray_subtraction,
    _adjust_hue,
)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, copied from the host without waiting for the device: a blocking copy ends in a stream
    synchronisation. CUDA stages a pageable source before the call returns, so ``t`` may be freed at once. A copy
    from a device stays blocking (the host could read a non-blocking one before it lands)."""
    return t.to(device, non_blocking=t.device.type == "cpu")


def color_jitter(
    x: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    active: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with its parameters drawn per sample, applied in place.

    Args:
        x: float images (B, 3, H, W) in [0, 1].
        factors: (B, 4) brightness, contrast, saturation and hue factors (hue in turns, [-0.5, 0.5]).
        order: (B, 4) a permutation of 0..3 per sample: the operations in the order that sample gets them. Keep it on
            the CPU: the samples of each (stage, operation) pair are selected where ``order`` lives, and on a GPU
            each of the 16 selections would make the host wait for the device.
        active: which operations the recipe uses (a strength of 0 skips one, as torchvision does).
    """
    factors = to_device(factors, x.device)
    for stage in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            sel = (order[:, stage] == op_id).nonzero().flatten() if active[op_id] else order.new_empty(0)
            if len(sel):
                sel = to_device(sel, x.device)
                x[sel] = op(x[sel], factors[sel, op_id])
    return x


# ----------------------------------------------------------------------------------------------------------------
# Crops


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes ``(x0, y0, x1, y1)`` in pixels (n, 4), torchvision's algorithm.

    Ten attempts per sample of area fraction ~ U(scale) and log-aspect ~ U(log ratio); the first that fits wins;
    samples with no fit fall back to the central crop clamped to the ratio range. Drawn on the CPU and moved to
    ``device`` if one is given.
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
    boxes = torch.stack([x0, y0, x0 + w_sel, y0 + h_sel], 1)
    return boxes if device is None else boxes.to(device)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop every image to its box (n, 4) and resize to ``size`` x ``size`` (bilinear, antialiased by
    adaptive sampling).

    Not torchvision's ``resized_crop`` pixel for pixel: ``roi_align`` averages bilinear samples over each output
    pixel's bin (a box filter) where torchvision shrinks with an antialiased triangle filter, and its samples near
    the box's edge read the image beyond the box where torchvision's crop-then-resize repeats the edge. On uniform
    noise in [0, 1] a 28x26 box shrunk to 24 px differs by up to 0.11 per pixel, and a 16x16 box enlarged to 32 px
    is equal inside but differs by up to 0.34 in the outer ring of pixels. The box draw is torchvision's.
    """
    idx = torch.arange(x.shape[0], device=x.device, dtype=x.dtype).view(-1, 1)
    rois = torch.cat([idx, to_device(boxes.to(x.dtype), x.device)], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view, one row per sample (drawn by :func:`draw_view_params`, on the CPU).

    :func:`apply_view_params` reads the flags and orders where they live and moves only index and factor tensors
    to the images' device: kept on the CPU (the default) they cost the device no synchronisation.
    """

    boxes: torch.Tensor  #: (B, 4) crop boxes ``(x0, y0, x1, y1)`` in pixels
    flip: torch.Tensor  #: (B,) bool, horizontal flip
    jitter: torch.Tensor  #: (B,) bool, colour jitter applied
    factors: torch.Tensor  #: (B, 4) brightness, contrast, saturation, hue (torchvision's units)
    order: torch.Tensor  #: (B, 4) the jitter operations' order per sample
    gray: torch.Tensor  #: (B,) bool, grayscale
    blur: torch.Tensor  #: (B,) bool, Gaussian blur
    sigma: torch.Tensor  #: (B,) blur sigma
    solarize: torch.Tensor  #: (B,) bool, solarisation at 0.5


def draw_view_params(
    batch: int,
    height: int,
    width: int,
    r: ViewRecipe,
    generator: torch.Generator | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    device: torch.device | str | None = None,
) -> ViewParams:
    """Draw one view's parameters for ``batch`` images of ``height`` x ``width`` from ``generator`` (on the CPU).

    With ``shard=(rank, world)`` the batch is rank's slice of a global batch of ``batch * world`` images: the
    draws are made for the whole global batch and sliced, so N processes draw exactly what one process draws.
    ``device`` moves the parameters there (the same values); leave it at ``None`` (the CPU):
    :func:`apply_view_params` reads flags and orders where they live, and on a GPU that waits for it about 20
    times per view.
    """
    g = generator
    rank, world = shard
    n, lo = batch * world, batch * rank

    def draw(*shape: int) -> torch.Tensor:  # uniform draws for the global batch, this shard's rows
        return torch.rand(n, *shape, generator=g)[lo : lo + batch]

    boxes = crop_boxes(n, height, width, r.crop_scale, r.crop_ratio, g)[lo : lo + batch]
    u, unit_factors, order_keys, sigma_u = draw(8), draw(4), draw(4), draw(1).flatten()
    lows = torch.tensor([max(0.0, 1 - r.brightness), max(0.0, 1 - r.contrast), max(0.0, 1 - r.saturation), -r.hue])
    highs = torch.tensor([1 + r.brightness, 1 + r.contrast, 1 + r.saturation, r.hue])
    p = ViewParams(
        boxes=boxes,
        flip=u[:, 0] < r.flip_p,
        jitter=u[:, 1] < r.jitter_p,
        factors=lows + (highs - lows) * unit_factors,
        order=torch.argsort(order_keys, 1),  # torchvision applies the four in a random order
        gray=u[:, 2] < r.gray_p,
        blur=u[:, 3] < r.blur_p,
        sigma=r.blur_sigma[0] + (r.blur_sigma[1] - r.blur_sigma[0]) * sigma_u,
        solarize=u[:, 4] < r.solarize_p,
    )
    if device is None:
        return p
    return ViewParams(**{f.name: getattr(p, f.name).to(device) for f in fields(ViewParams)})


def blur_kernel_size(r: ViewRecipe) -> int:
    """The recipe's odd blur kernel size (``blur_kernel``, or 10 % of the output size made odd)."""
    kernel = r.blur_kernel or int(0.1 * r.size)
    return kernel + 1 - kernel % 2


def apply_view_params(x: torch.Tensor, p: ViewParams, r: ViewRecipe) -> torch.Tensor:
    """Apply drawn parameters to float images (B, 3, H, W) in [0, 1]: crop-resize, flip, jitter, grayscale, blur,
    solarise, normalise (the torchvision pipeline's order). Returns float (B, 3, size, size).

    Which samples get an operation is read from ``p`` where it lives: with ``p`` on the CPU (as drawn) and ``x`` on
    a GPU nothing here waits for the GPU; the index, mask and factor tensors are copied without blocking.
    """
    device = x.device
    x = resized_crop(x, p.boxes, r.size).clamp_(0, 1)
    x = torch.where(to_device(p.flip, device).view(-1, 1, 1, 1), x.flip(-1), x)
    jitter = p.jitter.nonzero().flatten()
    if len(jitter):
        active = (r.brightness != 0, r.contrast != 0, r.saturation != 0, r.hue != 0)
        sel = to_device(jitter, device)
        x[sel] = color_jitter(x[sel], p.factors[jitter], p.order[jitter], active)
    if p.gray.any():
        gray = to_device(p.gray, device).view(-1, 1, 1, 1)
        x = torch.where(gray, KC.rgb_to_grayscale(x).expand_as(x), x)
    kernel = blur_kernel_size(r)
    blur = p.blur.nonzero().flatten()
    if len(blur) and kernel > 1:
        # sigma stays where it is: kornia checks a CPU sigma on the host and moves it without blocking
        sigma = p.sigma[blur].to(x.dtype).view(-1, 1).expand(-1, 2)
        sel = to_device(blur, device)
        x[sel] = KF.gaussian_blur2d(x[sel], (kernel, kernel), sigma, border_type="reflect")
    solarize = p.solarize.nonzero().flatten()
    if len(solarize):
        sel = to_device(solarize, device)
        # a 0-dim CPU threshold is a scalar to a GPU kernel; kornia copies a float one to the device, blocking
        x[sel] = KE.solarize(x[sel], thresholds=torch.tensor(0.5, dtype=x.dtype))
    if r.mean is not None and r.std is not None:
        x = normalize(x, r.mean, r.std)
    return x


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.normalize`` (the same operations, so the same bits), with mean and std
    moved to ``x``'s device without blocking: torchvision builds them with ``torch.as_tensor(..., device=...)``,
    a blocking copy from the host."""
    m = to_device(torch.as_tensor(mean, dtype=x.dtype), x.device).view(-1, 1, 1)
    s = to_device(torch.as_tensor(std, dtype=x.dtype), x.device).view(-1, 1, 1)
    return x.sub(m).div_(s)


def augment_view(
    images: torch.Tensor, r: ViewRecipe, generator: torch.Generator | None = None, *, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """One augmented view of a uint8 batch (B, H, W, 3) or (B, 3, H, W): float (B, 3, size, size), normalised.

    Random draws come from ``generator`` on the CPU (so results do not depend on the device) and stay there; the
    image maths runs on the batch's device, which the augmentation never waits for. With ``shard=(rank, world)``
    the batch is rank's slice of a global batch of ``B * world`` images: draws are made for the whole global batch
    and sliced, so N processes augment exactly as one process does on the global batch.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, H, W, 3), got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float().div_(255.0)
    B, _, H, W = x.shape
    return apply_view_params(x, draw_view_params(B, H, W, r, generator, shard=shard), r)


def eval_transform(images: torch.Tensor, r: ViewRecipe) -> torch.Tensor:
    """The deterministic test-time transform: uint8 (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, S, S), normalised
    like training.

    Images already at the recipe's size S are only normalised (CIFAR, STL-10); others are resized (bilinear).

    Raises:
        ValueError: ``images`` is not a uint8 batch of rank 4 (float images in [0, 1] would be divided by 255
            again, silently: convert them with ``(images * 255).round().to(torch.uint8)``).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"eval_transform takes a uint8 batch of images (B, H, W, 3) or (B, 3, H, W) with values 0-255, got "
            f"{images.dtype} of shape {tuple(images.shape)}; convert float images in [0, 1] with "
            "(images * 255).round().to(torch.uint8), and add a batch axis to a single image with images[None]"
        )
    x = images.permute(0, 3, 1, 2).float().div_(255.0) if images.shape[-1] == 3 else images.float() / 255.0
    if x.shape[-1] != r.size or x.shape[-2] != r.size:
        x = TF.resize(x, [r.size, r.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if r.mean is not None and r.std is not None:
        x = TF.normalize(x, list(r.mean), list(r.std))
    return x


class TwoViewAugment:
    """Callable producing the two augmented views of a uint8 batch.

    Examples:
        >>> aug = TwoViewAugment(*recipe("cifar", 32))
        >>> x1, x2 = aug(torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
    """

    def __init__(self, view1: ViewRecipe, view2: ViewRecipe) -> None:
        self.view1, self.view2 = view1, view2

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, *, shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            augment_view(images, self.view1, generator, shard=shard),
            augment_view(images, self.view2, generator, shard=shard),
        )
