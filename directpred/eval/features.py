"""Frozen features of the online encoder (backbone output, projector removed), as the authors' protocol uses."""

from __future__ import annotations

import torch
from torch import nn

from directpred import distributed
from directpred.data.augment import ViewRecipe, eval_transform


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    recipe: ViewRecipe,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Backbone features (N, D) of uint8 images (N, H, W, 3) with the deterministic test transform.

    The backbone runs in eval mode (BatchNorm running statistics) and no predictor statistics are touched. In a
    multi-process run each rank embeds its own stride of the images and the features are gathered, so every rank
    returns all N rows in the original order.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    r, w = distributed.rank(), distributed.world_size()
    index = torch.arange(r, len(images), w)
    chunks = []
    try:  # the caller's mode comes back also when a batch fails (out of memory, an interrupt)
        # At least one (maybe empty) batch: a rank with no images (fewer images than processes) still knows the
        # feature width for the gather.
        for start in range(0, max(len(index), 1), batch_size):
            batch = images[index[start : start + batch_size].to(images.device)].to(device, non_blocking=True)
            x = eval_transform(batch, recipe)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                chunks.append(backbone(x).float())
    finally:
        backbone.train(was_training)
    feats = torch.cat(chunks)
    return distributed.gather_strided(feats)  # rank r holds rows r, r+w, ...: all rows in the original order
