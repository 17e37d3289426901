"""Three-way classifier-free guidance of InstructPix2Pix (Brooks et al. 2022, eq. 3).

    e = e_u + s_T * (e_c - e_i) + s_I * (e_i - e_u)

e_c: conditioned on text and image; e_i: on the image only (text = "" embedding);
e_u: on neither (image latent = 0). s_T is the text guidance, s_I the image guidance.
Unlike diffusers' pipeline, s_I < 1 keeps guidance on: it is a legitimate "change more".
"""

from __future__ import annotations

import torch


def rows_needed(text_guidance: float, image_guidance: float) -> int:
    """How many UNet rows one sample needs per step.

    s_I == 1 cancels e_u (the formula becomes e_i + s_T (e_c - e_i)); s_T == s_I == 1 leaves e_c.
    """
    if image_guidance == 1.0:
        return 1 if text_guidance == 1.0 else 2
    return 3


def combine_guidance(
    e_c: torch.Tensor,
    e_i: torch.Tensor | None,
    e_u: torch.Tensor | None,
    text_guidance: float,
    image_guidance: float,
) -> torch.Tensor:
    """Combine the conditional predictions; e_i / e_u may be None where `rows_needed` says so."""
    if e_u is None:
        if e_i is None:
            return e_c
        return e_i + text_guidance * (e_c - e_i)
    assert e_i is not None
    return e_u + text_guidance * (e_c - e_i) + image_guidance * (e_i - e_u)
