"""Choosing the memory format: channels-last where it is fast and known to be correct.

Channels-last convolutions are faster on GPUs and CPUs, but oneDNN's CPU backward-weights kernel for a *strided 1x1*
convolution with fewer than 8 input channels (``jit_1x1:avx2``, uxlfoundation/oneDNN#6035) writes past its workspace
on CPUs without AVX-512: it crashes (SIGSEGV/SIGABRT) with one thread and can hang or return wrong weight gradients
with several. A ResNet's downsampling shortcut is exactly such a convolution once ``backbone.width < 8``. Rather than
trust CPU-feature detection (``ONEDNN_MAX_CPU_ISA`` and virtual machines can change what oneDNN dispatches to), the
rule is the simple one: on a CPU, a network with such a convolution runs in the default (contiguous) memory format.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from directpred.config import ConfigError

log = logging.getLogger(__name__)

MIN_SAFE_IN_CHANNELS = 8  # narrower strided 1x1 convolutions break oneDNN's channels-last backward on AVX2 CPUs
_said = False  # the fallback is logged once per process (a training run resolves it for the model and the probes)


def unsafe_channels_last_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions of ``model`` whose channels-last CPU backward is broken: 1x1, strided, < 8 input channels."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and tuple(m.kernel_size) == (1, 1)
        and tuple(m.stride) != (1, 1)
        and m.in_channels < MIN_SAFE_IN_CHANNELS
    ]


def resolve_channels_last(
    setting: bool | str, model: nn.Module, device: torch.device, *, training: bool = True
) -> bool:
    """Whether to run ``model`` in channels-last on ``device`` for ``train.channels_last`` = auto, true or false.

    ``auto`` uses channels-last unless the device is a CPU and the model has a convolution that
    :func:`unsafe_channels_last_convs` lists; then it uses the default format and, with ``training``, logs why,
    once per process. ``true`` on such a configuration raises :class:`ConfigError` with the reason.

    ``training=False`` (feature extraction, ``directpred eval``) takes the same decision, so that features are
    computed as in the training run, but logs nothing: the broken kernel is a backward one, and without a
    backward pass the note would only worry.
    """
    global _said
    if setting is False:
        return False
    bad = unsafe_channels_last_convs(model) if device.type == "cpu" else []
    if not bad:
        return True
    name, conv = min(bad, key=lambda nc: nc[1].in_channels)
    reason = (
        f"the network's strided 1x1 convolution {name!r} has {conv.in_channels} < {MIN_SAFE_IN_CHANNELS} input "
        "channels, whose channels-last backward crashes or computes wrong weight gradients in oneDNN on CPUs "
        "without AVX-512 (uxlfoundation/oneDNN#6035)"
    )
    if setting is True:
        raise ConfigError(
            f"train.channels_last=true is refused on the CPU: {reason}; use train.channels_last=auto "
            f"(or false), or a backbone.width of at least {MIN_SAFE_IN_CHANNELS}"
        )
    if training and not _said:
        _said = True
        log.warning("train.channels_last=auto: using the default memory format on the CPU, since %s", reason)
    return False
