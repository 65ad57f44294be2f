"""Batched augmentations: per-sample draws applied by kornia equal torchvision's per-sample maths; sharding = one
process."""

from __future__ import annotations

import dataclasses

import kornia.color as KC
import kornia.enhance as KE
import kornia.filters as KF
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from directpred.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    JITTER_OPS,
    TwoViewAugment,
    ViewRecipe,
    apply_view_params,
    augment_view,
    blur_kernel_size,
    color_jitter,
    crop_boxes,
    draw_view_params,
    recipe,
    resized_crop,
)

# kornia's luma weights are ITU-R 601's (0.299, 0.587, 0.114); torchvision rounds red to 0.2989, so grayscale,
# contrast and saturation differ by at most 1e-4 per op in [0, 1] pixel units (a uint8 step is 3.9e-3).
LUMA_ATOL = 3e-4
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _torchvision_view(x: torch.Tensor, p, r: ViewRecipe, i: int) -> torch.Tensor:
    """Sample i of a view built with torchvision.transforms.v2.functional from the same parameters, after our crop
    (which resamples differently: test_resized_crop_against_torchvision)."""
    y = resized_crop(x[i : i + 1], p.boxes[i : i + 1], r.size)[0].clamp(0, 1)
    if p.flip[i]:
        y = TF.horizontal_flip(y)
    if p.jitter[i]:
        for op_id in p.order[i].tolist():
            y = TV_JITTER[op_id](y, float(p.factors[i, op_id]))
    if p.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p.blur[i]:
        k = blur_kernel_size(r)
        y = TF.gaussian_blur(y, kernel_size=[k, k], sigma=[float(p.sigma[i])] * 2)
    if p.solarize[i]:
        y = TF.solarize(y, threshold=0.5)
    return TF.normalize(y, list(r.mean), list(r.std)) if r.mean is not None and r.std is not None else y


def test_color_jitter_matches_torchvision_per_sample_factors_and_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 20, 24, generator=g)
    lows, highs = torch.tensor([0.2, 0.2, 0.0, -0.5]), torch.tensor([1.8, 1.8, 1.8, 0.5])
    factors = lows + (highs - lows) * torch.rand(24, 4, generator=g)
    order = torch.argsort(torch.rand(24, 4, generator=g), 1)
    assert len(torch.unique(order, dim=0)) > 10  # many different orders in one batch
    out = color_jitter(x.clone(), factors, order)
    for i in range(len(x)):
        ref = x[i]
        for op_id in order[i].tolist():
            ref = TV_JITTER[op_id](ref, float(factors[i, op_id]))
        torch.testing.assert_close(out[i], ref, atol=LUMA_ATOL, rtol=0)
    # The order matters (the test would not notice a shared order otherwise).
    assert (color_jitter(x.clone(), factors, order.flip(1)) - out).abs().max() > 0.05


@pytest.mark.parametrize("name,view", [("cifar", 0), ("stl10", 0), ("imagenet", 0), ("imagenet", 1)])
def test_view_equals_torchvision_pipeline_per_sample(name, view):
    r = dataclasses.replace(recipe(name, 16)[view], jitter_p=0.7, gray_p=0.3)
    if r.blur_p:
        r = dataclasses.replace(r, blur_p=0.5)
    if r.solarize_p:
        r = dataclasses.replace(r, solarize_p=0.5)
    x = torch.rand(16, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    p = draw_view_params(16, 24, 20, r, torch.Generator().manual_seed(2))
    for flag, used in [
        (p.flip, True),
        (p.jitter, True),
        (p.gray, True),
        (p.blur, r.blur_p > 0),
        (p.solarize, r.solarize_p > 0),
    ]:
        assert bool(flag.any()) == used and not bool(flag.all())  # both branches exercised where used
    out = apply_view_params(x.clone(), p, r)
    scale = 1.0 if r.std is None else 1.0 / min(r.std)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], _torchvision_view(x, p, r, i), atol=3 * LUMA_ATOL * scale, rtol=0)


def _per_sample_view(x: torch.Tensor, p, r: ViewRecipe) -> torch.Tensor:
    """The view evaluated one sample at a time on the CPU, with the same kornia ops and parameters, branching on the
    flags as Python booleans: no masks, index tensors or device copies. Bit-identical to the batched path before
    ``augsync`` (host-side indices) too: checked at 82fba07 with this function."""
    active = (r.brightness != 0, r.contrast != 0, r.saturation != 0, r.hue != 0)
    k = blur_kernel_size(r)
    out = []
    for i in range(len(x)):
        y = resized_crop(x[i : i + 1], p.boxes[i : i + 1], r.size).clamp_(0, 1)
        if p.flip[i]:
            y = y.flip(-1)
        if p.jitter[i]:
            for op_id in p.order[i].tolist():
                if active[op_id]:
                    y = JITTER_OPS[op_id](y, p.factors[i : i + 1, op_id])
        if p.gray[i]:
            y = KC.rgb_to_grayscale(y).expand_as(y)
        if p.blur[i] and k > 1:
            y = KF.gaussian_blur2d(y, (k, k), p.sigma[i : i + 1, None].expand(-1, 2), border_type="reflect")
        if p.solarize[i]:
            y = KE.solarize(y, thresholds=0.5)
        out.append(TF.normalize(y, list(r.mean), list(r.std)) if r.mean is not None and r.std is not None else y)
    return torch.cat(out)


@pytest.mark.parametrize("name", ["cifar", "stl10", "imagenet"])
def test_two_views_are_bit_identical_to_a_per_sample_cpu_evaluation(name):
    """Every recipe, both views, several seeds and a shard: the batched views (flags read on the host, indices and
    factors moved to the batch's device) equal, bit for bit, the sample-by-sample evaluation of the same parameters
    with torchvision's normalize and kornia's float solarize threshold."""
    size = 32
    imgs = torch.randint(0, 256, (32, 40, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    x = imgs.permute(0, 3, 1, 2).float() / 255
    views = recipe(name, size)
    used = {"flip": 0, "jitter": 0, "gray": 0, "blur": 0, "solarize": 0}
    for seed, shard in [(0, (0, 1)), (1, (0, 1)), (2, (0, 1)), (3, (1, 2))]:
        x1, x2 = TwoViewAugment(*views)(imgs, torch.Generator().manual_seed(seed), shard=shard)
        g = torch.Generator().manual_seed(seed)
        for got, r in zip((x1, x2), views, strict=True):
            p = draw_view_params(32, 40, 36, r, g, shard=shard)
            assert torch.equal(got, _per_sample_view(x, p, r)), (name, seed, shard)
            for flag in used:
                used[flag] += int(getattr(p, flag).sum())
    assert used["flip"] and used["jitter"] and used["gray"]  # every branch the recipe has ran
    assert bool(used["blur"]) == (name != "cifar") and bool(used["solarize"]) == (name == "imagenet")


def test_augment_view_is_draw_then_apply():
    imgs = torch.randint(0, 256, (8, 24, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    r = recipe("imagenet", 16)[1]
    p = draw_view_params(8, 24, 20, r, torch.Generator().manual_seed(4))
    expected = apply_view_params(imgs.permute(0, 3, 1, 2).float() / 255, p, r)
    torch.testing.assert_close(augment_view(imgs, r, torch.Generator().manual_seed(4)), expected)


def test_full_box_crop_is_identity_resize():
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    torch.testing.assert_close(resized_crop(x, boxes, 16), x, atol=1e-5, rtol=1e-5)
    half = resized_crop(x, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), 8)
    torch.testing.assert_close(half, x[:, :, :8, :8], atol=1e-5, rtol=1e-5)


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(1)
    boxes = crop_boxes(4000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    area = w * h / 1024
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert 0.4 < area.mean() < 0.65  # E[U(0.08, 1)] = 0.54 before rounding and rejection
    assert len(torch.unique(boxes, dim=0)) > 500  # drawn per sample


def test_draws_are_per_sample_never_shared_by_the_batch():
    same = torch.full((64, 32, 32, 3), 128, dtype=torch.uint8)
    same[:, :16] = 30  # a structured image so crops differ visibly
    v = augment_view(same, recipe("cifar", 32)[0], torch.Generator().manual_seed(0))
    distinct = len(torch.unique(v.flatten(1), dim=0))
    assert distinct > 60  # 64 copies of one image give (nearly) 64 different views


def test_sharded_augmentation_equals_the_global_batch():
    imgs = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    r = recipe("stl10", 32)[0]
    whole = augment_view(imgs, r, torch.Generator().manual_seed(5))
    halves = [
        augment_view(imgs[k * 4 : (k + 1) * 4], r, torch.Generator().manual_seed(5), shard=(k, 2)) for k in range(2)
    ]
    torch.testing.assert_close(torch.cat(halves), whole)


def test_two_views_differ_and_are_normalised():
    imgs = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8)
    x1, x2 = TwoViewAugment(*recipe("cifar", 32))(imgs, torch.Generator().manual_seed(0))
    assert x1.shape == (256, 3, 32, 32) and not torch.allclose(x1, x2)
    # Exactly the CIFAR normalisation of the same view drawn without it (normalising draws nothing).
    r = recipe("cifar", 32)[0]
    raw = augment_view(imgs, dataclasses.replace(r, mean=None, std=None), torch.Generator().manual_seed(0))
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(augment_view(imgs, r, torch.Generator().manual_seed(0)), (raw - mean) / std)


def test_imagenet_recipe_is_asymmetric():
    v1, v2 = recipe("imagenet", 64)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    with pytest.raises(ValueError):
        recipe("nope", 32)


def test_resized_crop_against_torchvision():
    """The documented relation of our batched crop to torchvision's resized_crop: the same pixels for an identity box
    and inside an enlarged box; only the outer ring (which reads beyond the box) and shrunk boxes (box vs triangle
    antialias filter) differ, by bounded amounts."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def both(box, size):
        ours = resized_crop(x, torch.tensor([box], dtype=torch.float32), size)[0]
        x0, y0, x1, y1 = box
        return ours, TF.resized_crop(x[0], y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)

    ours, tv = both((0, 0, 32, 32), 32)
    torch.testing.assert_close(ours, tv, rtol=0, atol=1e-6)
    ours, tv = both((8, 8, 16, 16), 32)  # enlarged 4x
    torch.testing.assert_close(ours[:, 2:-2, 2:-2], tv[:, 2:-2, 2:-2], rtol=0, atol=1e-5)
    assert 0.05 < (ours - tv).abs().max() < 0.5
    ours, tv = both((2, 3, 30, 29), 24)  # shrunk
    assert (ours - tv).abs().mean() < 0.03 and (ours - tv).abs().max() < 0.2


def test_eval_transform_refuses_float_images_that_it_would_divide_by_255_again():
    # What a torchvision ToTensor() pipeline gives (float in [0, 1]) was divided by 255 again: near-black images,
    # features silently wrong. uint8 in either layout gives the same normalised batch.
    from directpred.data.augment import ViewRecipe, eval_transform

    r = ViewRecipe(size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = eval_transform(u8, r)
    ref = (u8.permute(0, 3, 1, 2).float() / 255 - torch.tensor(r.mean).view(1, 3, 1, 1)) / 0.2
    torch.testing.assert_close(x, ref)
    torch.testing.assert_close(eval_transform(u8.permute(0, 3, 1, 2), r), x)
    with pytest.raises(
        ValueError, match=r"eval_transform takes a uint8 batch .* got torch.float32 of shape \(2, 8, 8, 3\)"
    ):
        eval_transform(u8.float() / 255, r)
    with pytest.raises(ValueError, match=r"got torch.uint8 of shape \(8, 8, 3\).*images\[None\]"):
        eval_transform(u8[0], r)
