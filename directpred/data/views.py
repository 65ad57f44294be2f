"""The view recipes of a configuration: which augmentation (``data.augment``) and test-time transform a run uses."""

from __future__ import annotations

from directpred.config import Config
from directpred.data.augment import ViewRecipe, recipe
from directpred.data.datasets import DataBundle
from directpred.data.stream import StreamData


def view_recipes(cfg: Config, data: DataBundle | StreamData) -> tuple[ViewRecipe, ViewRecipe]:
    """The augmentation recipe of ``data.augment`` (``auto``: by dataset and image size)."""
    return recipes_for(cfg, cfg.data.image_size or data.image_size)


def recipes_for(cfg: Config, size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """The two view recipes of ``cfg`` for images of ``size`` pixels."""
    name = cfg.data.augment
    if name == "auto":
        name = "stl10" if cfg.data.dataset == "stl10" else ("cifar" if size <= 64 else "imagenet")
    return recipe(name, size)


def eval_recipe(cfg: Config, size: int) -> ViewRecipe:
    """The recipe whose size and normalisation the test-time transform (kNN, probe, embeddings) uses."""
    return recipes_for(cfg, size)[1]
