"""Widening a text-to-image UNet to InstructPix2Pix's 8 input channels, the paper's way."""

from __future__ import annotations

import copy

import torch

from tests.tiny_models.sd import build_tiny_components
from training.model_init import expand_conv_in


def test_expanded_unet_computes_what_the_base_did_when_the_image_is_zero() -> None:
    unet = build_tiny_components(in_channels=4)["unet"].eval()
    with torch.no_grad():
        unet.conv_in.bias.normal_()  # a bias that matters (diffusers issue 4960 dropped it)
    base = copy.deepcopy(unet)
    expand_conv_in(unet)
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    assert torch.equal(unet.conv_in.bias, base.conv_in.bias)

    torch.manual_seed(0)
    noisy, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = base(noisy, 500, text).sample
        after = unet(torch.cat([noisy, torch.randn(1, 4, 16, 16)], dim=1), 500, text).sample
    torch.testing.assert_close(after, before)  # image channels start with no influence at all
