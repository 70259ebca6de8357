"""The forecaster extrapolates a sample's own history exactly to first order, on the device."""

import pytest
import torch

from fastcache_core.forecast import StackHistory, guided_error
from fastcache_core.state import RowPool


def history_with_rows(rows: int = 2) -> tuple[StackHistory, torch.Tensor]:
    pool = RowPool()
    slots = torch.tensor([pool.acquire() for _ in range(rows)])
    return StackHistory(pool), slots


def test_a_linear_trajectory_is_forecast_exactly_with_uneven_gaps():
    history, slots = history_with_rows()
    base, slope = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    at = lambda t: base + t * slope  # noqa: E731
    ones = torch.ones(2)
    history.record(slots, torch.tensor([0.9, 0.9]), at(0.9))
    history.record(slots, torch.tensor([0.8, 0.75]), torch.stack([at(0.8)[0], at(0.75)[1]]))
    forecast = history.forecast(slots, torch.tensor([0.5, 0.6]), ones, base)
    torch.testing.assert_close(forecast, torch.stack([at(0.5)[0], at(0.6)[1]]))


def test_a_bfloat16_models_forecast_keeps_float32_times_and_slopes():
    # outputs exact in bfloat16; the times 0.97, 0.98, 0.99 are not (bfloat16 rounds them by up to 0.004)
    history, slots = history_with_rows(1)
    like = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    history.record(slots, torch.tensor([0.97]), torch.full((1, 1, 1), 1.0, dtype=torch.bfloat16))
    history.record(slots, torch.tensor([0.98]), torch.full((1, 1, 1), 1.0625, dtype=torch.bfloat16))
    forecast = history.forecast(slots, torch.tensor([0.99]), torch.ones(1, dtype=torch.bfloat16), like)
    assert forecast.dtype == torch.bfloat16
    assert forecast.item() == 1.125  # the line through both records (bfloat16 times and slopes gave 1.116)


def test_after_a_single_compute_the_forecast_is_the_last_output():
    history, slots = history_with_rows()
    y = torch.randn(2, 4, 3)
    history.record(slots, torch.tensor([0.9, 0.9]), y)
    torch.testing.assert_close(history.forecast(slots, torch.tensor([0.7, 0.7]), torch.ones(2), y), y)


def test_the_gain_scales_the_first_order_term_per_row():
    history, slots = history_with_rows()
    history.record(slots, torch.tensor([1.0, 1.0]), torch.zeros(2, 1, 1))
    history.record(slots, torch.tensor([0.5, 0.5]), torch.ones(2, 1, 1))
    forecast = history.forecast(slots, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5]), torch.zeros(2, 1, 1))
    assert forecast.flatten().tolist() == [2.0, 1.5]


def test_a_row_forecasts_only_from_its_own_slot():
    history, slots = history_with_rows(3)
    outputs = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2).contiguous()
    history.record(slots, torch.full((3,), 0.5), outputs)
    one = slots[1:2]
    torch.testing.assert_close(history.forecast(one, torch.tensor([0.4]), torch.ones(1), outputs), outputs[1:2])


def test_residual_reuse_adds_the_last_computed_residual_to_the_new_input():
    history, slots = history_with_rows()
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    history.record(slots, torch.ones(2), y)
    history.record_input(slots, x)
    new_x = torch.randn(2, 3, 4)
    torch.testing.assert_close(history.residual_reuse(slots, new_x), new_x + (y - x))


def test_the_error_is_measured_through_the_output_layer():
    forecast, real = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    projection = torch.tensor([[1.0, 0.0, 0.0]])  # keeps the first feature only
    squared, reference, count = guided_error(forecast, real, projection, None)
    assert (squared.item(), reference.item(), count) == (2.0, 2.0, 2)
    squared, _, count = guided_error(forecast, real, None, None)
    assert (squared.item(), count) == (6.0, 6)


def test_with_guidance_the_error_is_the_guided_predictions_error():
    real = torch.zeros(2, 1, 1)
    forecast = torch.tensor([[[1.0]], [[0.5]]])  # conditional row off by 1, unconditional by 0.5
    squared, _, count = guided_error(forecast, real, None, 4.0, cond_row=0)
    assert squared.item() == pytest.approx((4 * 1.0 - 3 * 0.5) ** 2) and count == 1
    squared, _, _ = guided_error(forecast, real, None, 4.0, cond_row=1)
    assert squared.item() == pytest.approx((4 * 0.5 - 3 * 1.0) ** 2)
