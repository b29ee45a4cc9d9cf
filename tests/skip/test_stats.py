"""SkipStats (hsd_exp.skip.stats), the engine's output contract: what record / record_rows store, the paper's Avg.
Layer, per-token run rates, and last_call holding the latest generate() call only."""

import math

import pytest
import torch

from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import build_policy
from hsd_exp.skip.stats import SkipStats

from helpers import PROMPTS, T, load


def test_record_stores_one_step_and_avg_layers_is_the_mean_of_per_step():
    stats = SkipStats(num_layers=6)
    assert math.isnan(stats.avg_layers)  # no decode step (max_new_tokens=1: prefill only)
    stats.record((1, 3, 5))
    stats.record((0, 1, 2, 3, 4, 5), kv_only=0, evals=0)
    stats.record((0, 1), kv_only=4, evals=2)  # a CALM step exiting at layer 2, two checks computed
    assert stats.per_step == [3, 6, 2] and stats.last_call == [3, 6, 2]
    assert stats.step_layers == [(1, 3, 5), (0, 1, 2, 3, 4, 5), (0, 1)]
    assert stats.kv_only == [0, 0, 4] and stats.confidence_evals == [0, 0, 2]
    assert stats.avg_layers == pytest.approx(11 / 3)
    assert stats.last_call_rows == [] and stats.run_rates() == []  # nothing recorded per row


def test_record_rows_keeps_each_rows_count_and_the_mean():
    """A per-token step where rows differ: per_step holds the rows' mean, kv_only the rest of L."""
    stats = SkipStats(num_layers=4)
    stats.record_rows([4, 2, 3], layer_rows=[3, 3, 2, 1], token=0)
    stats.record_rows([1, 3], layer_rows=[2, 1, 1, 0], token=1)
    assert stats.per_step == [3.0, 2.0] and stats.last_call == [3.0, 2.0]
    assert stats.last_call_rows == [[4, 2, 3], [1, 3]]
    assert stats.kv_only == [1.0, 2.0] and stats.confidence_evals == [0, 0]
    assert stats.step_layers == [(), ()] and stats.layer_rows == [(3, 3, 2, 1), (2, 1, 1, 0)]
    assert stats.avg_layers == 2.5
    assert stats.rows_by_token == {0: 3, 1: 2}


def test_run_rates_are_the_share_of_rows_per_layer_and_token():
    """(L, Tmax): rows that ran layer l at token T over rows decoded at T, summed over calls; NaN where no row
    was decoded at T."""
    stats = SkipStats(num_layers=2)
    stats.record_rows([2, 1], layer_rows=[2, 1], token=0)
    stats.record_rows([1, 1], layer_rows=[2, 0], token=0)  # a second batch at T = 0: counts add up
    stats.record_rows([2], layer_rows=[1, 1], token=2)  # nothing at T = 1
    rates = stats.run_rates()
    assert len(rates) == 2 and all(len(row) == 3 for row in rates)
    assert rates[0][0] == 1.0 and rates[1][0] == 0.25
    assert math.isnan(rates[0][1]) and math.isnan(rates[1][1])
    assert rates[0][2] == 1.0 and rates[1][2] == 1.0


def test_record_rows_without_layer_rows_keeps_no_rates():
    stats = SkipStats(num_layers=3)
    stats.record_rows([3, 1])
    assert stats.layer_rows == [()] and stats.runs_by_token == {} and stats.run_rates() == []


@pytest.mark.parametrize("name,params", [("hsd", {"s": 1, "min": 0, "max": 4}), ("calm", {"d": 0.05, "criterion": "state"})])
def test_last_call_holds_the_latest_generate_call_and_the_rest_add_up(name, params):
    """The evaluation reads each batch's layers per token from last_call; per_step, prefill_tokens and decode_rows
    count every call in the context."""
    lm = load("tiny-llama")
    policy = build_policy(name, **params)
    short, long = (lm.tokenizer(PROMPTS[:b], return_tensors="pt", padding=True) for b in (1, 3))
    with layer_skipping(lm.model, policy, max_new_tokens=T) as stats, torch.no_grad():
        lm.model.generate(**long, max_new_tokens=T, min_new_tokens=T, do_sample=False)
        first = list(stats.last_call)
        lm.model.generate(**short, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(first) == T - 1 and len(stats.last_call) == 4  # tokens after the prefill's, this call only
    assert stats.per_step == first + stats.last_call
    assert stats.prefill_tokens == long.input_ids.numel() + short.input_ids.numel()
    assert stats.decode_rows == 3 * (T - 1) + 4
