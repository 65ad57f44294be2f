"""Batched augmentations: torchvision's maths per sample, per-sample draws, sharding = one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from directpred.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    TwoViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_view,
    crop_boxes,
    gaussian_blur,
    grayscale,
    recipe,
    resized_crop,
)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 20, 24, generator=g)


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (adjust_saturation, TF.adjust_saturation, 0.0, 1.8),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_match_torchvision_per_sample(images, ours, theirs, lo, hi):
    f = torch.linspace(lo, hi, len(images))
    batched = ours(images.clone(), f)
    for i in range(len(images)):
        torch.testing.assert_close(batched[i], theirs(images[i], float(f[i])), atol=2e-5, rtol=1e-5)


def test_grayscale_and_blur_match_torchvision(images):
    torch.testing.assert_close(grayscale(images)[0], TF.rgb_to_grayscale(images[0]), atol=1e-6, rtol=1e-6)
    sigma = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 0.1])
    blurred = gaussian_blur(images, 5, sigma)
    for i in range(len(images)):
        ref = TF.gaussian_blur(images[i], kernel_size=[5, 5], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(blurred[i], ref, atol=1e-5, rtol=1e-5)


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
    halves = [augment_view(imgs[k * 4:(k + 1) * 4], r, torch.Generator().manual_seed(5), shard=(k, 2))
              for k in range(2)]
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
