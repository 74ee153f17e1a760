"""The CPU few-row linear: both product forms compute F.linear, and the calibration picks per row count."""
import pytest
import torch
import torch.nn.functional as F

import sift.models.layers as layers
from sift.models.layers import CALIBRATED_ROWS, calibrate_linear, linear, linear_products


def test_row_counts_follow_the_next_calibrated_one():
    assert [layers._row_point(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [layers._row_point(n) for n in (32, 48, 64, 128, 512)] == [32, 64, 64, 64, 64]
    assert [layers._row_point(n) for n in (0, 17, 31, 40, 528)] == [None] * 5  # F.linear only


@pytest.mark.parametrize("weight_first", [False, True])
@pytest.mark.parametrize("n", [1, 3, 9, 16, 48, 100])
def test_both_forms_compute_f_linear(weight_first, n):
    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(n, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    with linear_products({r: weight_first for r in CALIBRATED_ROWS}):
        out = linear(x[None], w, b)
    assert out.shape == (1, n, 40) and out.is_contiguous()
    torch.testing.assert_close(out[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_calibration_chooses_every_row_count_once_per_shape_set():
    saved, saved_key = dict(layers._weight_first), layers._calibrated_for
    try:
        weights = [torch.randn(64, 32), torch.randn(32, 64)]
        chosen = calibrate_linear(weights, reps=1)
        assert set(chosen) == set(CALIBRATED_ROWS) and all(isinstance(v, bool) for v in chosen.values())
        assert layers._weight_first == chosen
        layers._weight_first[1] = not chosen[1]  # a second call with the same shapes does not measure again
        assert calibrate_linear(weights, reps=1)[1] == (not chosen[1])
        assert calibrate_linear([w.to(torch.bfloat16) for w in weights]) == layers._weight_first  # not float32
    finally:
        layers._weight_first.clear()
        layers._weight_first.update(saved)
        layers._calibrated_for = saved_key
