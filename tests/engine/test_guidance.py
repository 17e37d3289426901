import pytest
import torch

from engine.guidance import combine_guidance, rows_needed


def test_three_way_formula_matches_the_paper() -> None:
    e_c, e_i, e_u = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([0.5])
    # e_u + s_T (e_c - e_i) + s_I (e_i - e_u) = 0.5 + 7.5 * 1 + 1.5 * 1.5
    assert combine_guidance(e_c, e_i, e_u, 7.5, 1.5).item() == pytest.approx(10.25)


def test_image_guidance_below_one_keeps_guidance_on() -> None:
    e_c, e_i, e_u = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([0.5])
    got = combine_guidance(e_c, e_i, e_u, 7.5, 0.5).item()
    assert got == pytest.approx(0.5 + 7.5 * 1.0 + 0.5 * 1.5)
    assert got != pytest.approx(e_c.item())  # diffusers would return e_c here


def test_unit_image_guidance_needs_two_rows_and_agrees_with_three() -> None:
    e_c, e_i, e_u = torch.randn(4), torch.randn(4), torch.randn(4)
    assert rows_needed(7.5, 1.0) == 2
    two = combine_guidance(e_c, e_i, None, 7.5, 1.0)
    three = combine_guidance(e_c, e_i, e_u, 7.5, 1.0)
    torch.testing.assert_close(two, three)


def test_no_guidance_at_all_needs_one_row() -> None:
    e_c = torch.randn(4)
    assert rows_needed(1.0, 1.0) == 1
    assert rows_needed(7.5, 1.5) == 3 and rows_needed(1.0, 1.5) == 3
    torch.testing.assert_close(combine_guidance(e_c, None, None, 1.0, 1.0), e_c)
