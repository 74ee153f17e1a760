"""The CPU few-row linear: both product forms compute F.linear, and the calibration picks per row count."""
import pytest
import torch
import torch.nn.functional as F

import sift.models.layers as layers
from sift.models.layers import CALIBRATED_ROWS, Linear, calibrate_linear, linear


def test_row_counts_follow_the_next_calibrated_one():
    assert [layers._row_point(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [layers._row_point(n) for n in (32, 48, 64, 128, 512)] == [32, 64, 64, 64, 64]
    assert [layers._row_point(n) for n in (0, 17, 31, 40, 528)] == [None] * 5  # F.linear only


@pytest.mark.parametrize("weight_first", [False, True])
@pytest.mark.parametrize("n", [1, 3, 9, 16, 48, 100])
def test_both_forms_compute_f_linear(weight_first, n):
    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(n, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    out = linear(x[None], w, b, {r: weight_first for r in CALIBRATED_ROWS})
    assert out.shape == (1, n, 40) and out.is_contiguous()
    torch.testing.assert_close(out[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_calibration_chooses_every_row_count_once_per_shape_set(monkeypatch):
    monkeypatch.setattr(layers, "_measured", {})
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    chosen = calibrate_linear(weights, reps=1)
    assert set(chosen) == set(CALIBRATED_ROWS) and all(isinstance(v, bool) for v in chosen.values())
    assert list(layers._measured.values()) == [chosen]
    next(iter(layers._measured.values()))[1] = not chosen[1]  # a second call with the same shapes does not measure again
    assert calibrate_linear(weights, reps=1)[1] == (not chosen[1])
    assert calibrate_linear([w.to(torch.bfloat16) for w in weights]) == {}  # not float32: no choice to make


def test_each_module_runs_the_choice_its_model_was_given(monkeypatch):
    """The choice lives on the modules (handed over at load), not in a global: two modules, two forms."""
    calls = []
    real = layers._weight_first_product
    monkeypatch.setattr(layers, "_weight_first_product", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 24)
    plain, weight_first = Linear(24, 40), Linear(24, 40)
    weight_first.weight_first = {r: True for r in CALIBRATED_ROWS}
    plain(x)
    assert calls == []
    torch.testing.assert_close(weight_first(x), F.linear(x, weight_first.weight, weight_first.bias))
    assert calls == [1]
