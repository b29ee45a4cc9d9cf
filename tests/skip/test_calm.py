"""hsd_exp.skip.calm without a model: CALM's threshold, confidence, batch exit rule and per-step decisions."""

import pytest
import torch

from hsd_exp.errors import ConfigError
from hsd_exp.skip.calm import CalmExit, batch_exits, confidence
from hsd_exp.skip.policies import build_policy


def test_calm_threshold_decreases_with_depth():
    p = build_policy("calm", d=0.02)
    assert p.threshold(1, 0, 10) == pytest.approx(0.98)
    assert p.threshold(30, 0, 10) == pytest.approx(0.4)
    assert p.threshold(60, 0, 10) == 0.0  # clipped
    decayed = build_policy("calm", d=0.02, decay=True, tau=4.0)
    assert decayed.threshold(10, 0, 10) == pytest.approx(0.9 * 0.8 + 0.1)
    assert decayed.threshold(10, 10, 10) < decayed.threshold(10, 0, 10)


def test_confidence_is_the_softmax_margin_or_the_state_cosine():
    logits = torch.tensor([[[2.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]])  # (B=2, 1, V=3), read out as is
    probs = logits[:, -1].softmax(-1)
    margin = confidence("softmax", None, logits, readout=lambda h: h)
    assert torch.allclose(margin, probs[:, 0] - probs[:, 2]) and margin[1] == 0  # a flat row: no margin
    h_in, h_out = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])
    assert confidence("state", h_in, h_out, readout=None).tolist() == [1.0, 0.0]  # cos(h_i, h_{i-1})


def test_the_batch_exits_only_when_its_least_confident_row_is_confident():
    conf = torch.tensor([0.9, 0.5, 0.7])
    assert batch_exits(conf, 0.6) == (pytest.approx(0.5), False)
    assert batch_exits(conf, 0.5) == (pytest.approx(0.5), True)


def test_a_step_runs_until_confident_and_checks_from_first_exit():
    policy = build_policy("calm", d=0.1, criterion="state", first_exit=2)
    step = policy.begin_step(step=0, max_steps=8, num_layers=6, readout=None)
    same, turned = torch.ones(2, 1, 4), torch.tensor([[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]]])
    step.after_layer(1, same, same)  # below first_exit: not checked
    assert step.runs(2) and step.evals == 0
    step.after_layer(2, same, turned)  # cos < lambda_2 = 0.8 for a row: the batch goes on
    assert step.runs(3) and step.evals == 1
    step.after_layer(3, same, same)  # cos = 1 >= lambda_3 = 0.7 for every row: exit after layer 3
    assert not step.runs(4)
    assert step.record((0, 1, 2)) == CalmExit(step=0, exit_layer=3, confidences=pytest.approx([0.5, 1.0]),
                                               thresholds=pytest.approx([0.8, 0.7]))


@pytest.mark.parametrize("d", [0, -0.1, 1.5, 20])
def test_d_outside_0_1_is_refused(d):
    """lambda_i = clip(1 - d*i, 0, 1): d > 1 passed and made every token exit at first_exit, silently."""
    with pytest.raises(ConfigError, match=rf"policy.d={d} is out of range: must be in \(0, 1\]") as err:
        build_policy("calm", d=d)
    assert "\n" not in str(err.value)
    build_policy("calm", d=1.0)  # the edge of the range: accepted
