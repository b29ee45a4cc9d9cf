"""Skip-robust recipes (hsd_exp.train.recipes): schedule families, layer dropout, early-exit loss, distillation.

Each test checks the recipe's formula or the computation a training step runs, so a wrong loss or schedule fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_module import fixed_batch, make_cfg, make_module

from hsd_exp import layer_skipping
from hsd_exp.errors import ConfigError
from hsd_exp.models.layout import decoder_layers, layout_of, readout, submodule, unwrap
from hsd_exp.skip.early_exit import EarlyExit
from hsd_exp.skip.policies import build_policy
from hsd_exp.train.recipes import (
    LayerDropout,
    Recipe,
    distill_kl,
    dropout_rates,
    early_exit_loss,
    exit_weights,
    layer_outputs,
    schedule_family,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def forward(model, batch, policy=None, tmax=8):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    if policy is None:
        return model(**inputs)
    with layer_skipping(model, policy, max_new_tokens=tmax, prompt_len=int(batch["prompt_len"])):
        return model(**inputs)


# ---------------------------------------------------------------------------------------------- schedule families
def test_a_schedule_family_expands_list_valued_parameters_to_their_grid():
    family = schedule_family([{"name": "hsd", "s": [1, 2], "min": 0, "max": [3, 5]},
                              {"name": "skipdecode", "min": 2, "max": 2, "keep_first": [1, 2]},
                              {"name": "hsd", "s": 1, "min": 0, "max": 3}], num_layers=6)  # a repeat
    assert [p.label for p in family] == ["hsd(s=1,0,3)", "hsd(s=1,0,5)", "hsd(s=2,0,3)", "hsd(s=2,0,5)",
                                         "skipdecode(2,2,keep_first=1)", "skipdecode(2,2,keep_first=2)"]
    assert schedule_family({"name": "full"}) == [build_policy("full")]
    assert schedule_family(None) == []


@pytest.mark.parametrize("nodes, message", [
    ({"name": "hsd", "max": [3, 9]}, "policy.max=9 is out of range"),
    ({"name": "calm"}, "not a static schedule"),
    ({"s": 1}, "is not a policy node"),
    ({"name": "nope"}, "policy.name=nope is unknown"),
])
def test_a_bad_schedule_family_names_the_member(nodes, message):
    with pytest.raises(ConfigError, match=message):
        schedule_family(nodes, num_layers=6)


def test_a_skipped_step_draws_each_member_and_full_depth_at_its_rate():
    family = schedule_family({"name": "hsd", "s": [1, 2], "max": 4}, 6)
    recipe = Recipe.from_config({"schedules": {"name": "hsd", "s": [1, 2], "max": 4}, "full_depth_rate": 0.25}, None, 6)
    rng = random.Random(0)
    draws = [recipe.draw(rng) for _ in range(4000)]
    kinds = [k for k, _ in draws]
    assert abs(kinds.count("full_depth") / 4000 - 0.25) < 0.03
    members = [p for k, p in draws if k == "skipped"]
    assert set(members) == set(family) and abs(members.count(family[0]) / len(members) - 0.5) < 0.04


def test_plain_skip_aware_training_uses_the_runs_policy_and_plain_training_never_skips():
    hsd = build_policy("hsd", s=1, min=0, max=4)
    recipe = Recipe.from_config({"skip_aware": True, "full_depth_rate": 0.0}, hsd, 6)
    assert recipe.schedules == (hsd,) and recipe.draw(random.Random(1)) == ("skipped", hsd)
    plain = Recipe.from_config({"mode": "lora"}, hsd, 6)
    assert plain.plain and {plain.draw(random.Random(i)) for i in range(20)} == {("full_depth", None)}


@pytest.mark.parametrize("ft, message", [
    ({"layer_dropout": {"p_max": 1.5}}, "layer_dropout.p_max=1.5"),
    ({"layer_dropout": {"p_max": 0.1, "keep_bottom": 9}}, "keep_bottom=9"),
    ({"exit_loss": {"scale": 1, "curriculum": "gradual"}}, "curriculum=gradual is unknown"),
    ({"exit_loss": {"scale": 1, "rotation": 0}}, "rotation=0"),
    ({"distill_weight": -1}, "distill_weight=-1"),
    ({"schedules": {"name": "full"}, "full_depth_rate": 2}, "full_depth_rate=2"),
    ({"skip_aware": True}, "needs a static policy"),
])
def test_bad_recipe_settings_fail_with_the_key(ft, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_config(ft, None, 6)


def test_the_cli_refuses_a_bad_recipe_before_the_model_loads(tmp_path):
    from hsd_exp import preflight

    cfg = make_cfg(tmp_path, "task=finetune", "finetune=lora", "+finetune.schedules={name: hsd, max: 40}")
    with pytest.raises(ConfigError, match=r"policy.max=40 is out of range"):
        preflight.check(cfg)


# ---------------------------------------------------------------------------------------------- layer dropout
def test_dropout_rates_rise_exponentially_from_zero_to_p_max():
    rates = dropout_rates(5, 0.4)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.4)
    assert rates[2] == pytest.approx(0.4 * (math.sqrt(2) - 1))  # D(l) = exp(l ln2 / (L-1)) - 1 = 2^(l/(L-1)) - 1
    assert dropout_rates(5, 0.4, keep_bottom=3)[:3] == [0, 0, 0]
    assert dropout_rates(5, 0.4, keep_bottom=3)[3:] == rates[3:]


def test_layer_dropout_draws_each_rows_layers_at_their_rates_and_never_touches_the_prompt():
    torch.manual_seed(0)
    policy = LayerDropout(p_max=0.6, keep_bottom=1, num_layers=4)
    step = policy.begin_forward([-2, -1, 0, 1], "cpu")
    h = torch.zeros(20000, 4, 8)
    runs = torch.stack([step.decide(i, h) for i in range(4)])  # (L, B, Q)
    assert runs[:, :, :2].all()  # prompt positions run every layer
    assert torch.equal(runs[:, :, 2], runs[:, :, 3])  # a row drops a layer for all its target tokens
    dropped = 1 - runs[:, :, 2].float().mean(1)
    assert torch.allclose(dropped, torch.tensor(dropout_rates(4, 0.6, 1)), atol=0.015)


def test_a_dropped_layer_passes_the_state_through_exactly(tmp_path):
    """p_max=1 and keep_bottom=L-1: only the top layer has a rate (1), so every row drops it at its target positions
    and the forward equals the early exit at L-1 under the decode-time schedule."""
    lm = _tiny(tmp_path)
    batch = fixed_batch(make_cfg(tmp_path), lm)
    L = len(decoder_layers(lm.model))
    with torch.no_grad():
        dropped = forward(lm.model, batch, LayerDropout(p_max=1.0, keep_bottom=L - 1, num_layers=L)).logits
        exit_early = forward(lm.model, batch, EarlyExit(layer=L - 1)).logits
        full = forward(lm.model, batch).logits
    assert torch.equal(dropped, exit_early)
    P = int(batch["prompt_len"])
    assert torch.equal(dropped[:, :P], full[:, :P]) and not torch.equal(dropped[:, P:], full[:, P:])


# ---------------------------------------------------------------------------------------------- early-exit loss
def test_exit_weights_follow_layerskip_and_sum_to_one():
    # arXiv 2404.16710 eq. 4: e(l) = e_scale * (0 + 1 + .. + l) for l < L-1, e(L-1) = L-1 + e_scale * (0 + .. + L-2).
    # L=4, scale 1: e = [0, 1, 3, 3 + 3] -> / 10
    assert exit_weights(4, 0, 1.0, "none") == pytest.approx([0, 1 / 10, 3 / 10, 6 / 10])
    # scale 2: e = [0, 2, 6, 3 + 2 * 3] -> / 17
    assert exit_weights(4, 0, 2.0, "none") == pytest.approx([0, 2 / 17, 6 / 17, 9 / 17])
    # rotational, R=2: step t enables l = t mod 2 (and the last layer)
    assert exit_weights(4, 1, 1.0, "rotational", 2) == pytest.approx([0, 1 / 7, 0, 6 / 7])
    assert exit_weights(4, 2, 1.0, "rotational", 2) == pytest.approx([0, 0, 3 / 9, 6 / 9])  # l = 0, 2 on; e(0) = 0
    assert exit_weights(6, 3, 0.0, "none") == pytest.approx([0, 0, 0, 0, 0, 1])  # scale 0: the final CE alone
    assert exit_weights(1, 0, 1.0, "none") == [1.0]


def test_at_smollm2s_depth_the_last_layer_carries_the_largest_exit_weight():
    """L = 30, e_scale = 1 (finetune=layerskip). By hand: e(l) = l(l+1)/2 for l <= 28, whose sum over l = 0..28 is
    the tetrahedral number 28 * 29 * 30 / 6 = 4060; e(29) = 29 + 28 * 29 / 2 = 29 + 406 = 435; total 4495."""
    w = exit_weights(30, 0, 1.0, "none")
    assert sum(w) == pytest.approx(1.0)
    assert w[29] == pytest.approx(435 / 4495)  # 9.7% (L - 1 alone for the last layer gave 29 / 4089 = 0.7%)
    assert w[28] == pytest.approx(406 / 4495) and w[10] == pytest.approx(55 / 4495)
    assert w[29] == max(w) and w.index(max(w)) == 29
    # rotational, R = 4: step 1 enables l = 1, 5, .., 25 (e = 1 + 15 + 45 + 91 + 153 + 231 + 325 = 861) and 29
    rot = exit_weights(30, 1, 1.0, "rotational", 4)
    assert rot[29] == pytest.approx(435 / (861 + 435)) and rot[25] == pytest.approx(325 / 1296)
    assert [i for i, x in enumerate(rot) if x] == [1, 5, 9, 13, 17, 21, 25, 29]
    for step in range(4):  # every rotation: the weights sum to 1 and the last layer's is the largest
        rot = exit_weights(30, step, 1.0, "rotational", 4)
        assert sum(rot) == pytest.approx(1.0) and max(rot[:29]) < rot[29]
    for scale in (0.1, 1.0, 5.0):  # whatever e_scale: e(L-1) exceeds e(L-2) by L - 1
        w = exit_weights(30, 0, scale, "none")
        assert w[29] > w[28] and (w[29] - w[28]) * (4060 * scale + 29 + 406 * scale) == pytest.approx(29)


@torch.no_grad()
def test_the_early_exit_loss_is_the_weighted_ce_of_each_layers_readout(tmp_path):
    lm = _tiny(tmp_path)
    model = lm.model
    batch = fixed_batch(make_cfg(tmp_path), lm)
    layers = decoder_layers(model)
    family = layout_of(model)
    norm, head = submodule(model, family.final_norm), submodule(model, family.lm_head)  # by hand, not readout()
    with layer_outputs(layers) as outs:
        out = forward(model, batch)
    weights = exit_weights(len(layers), 1, 1.0, "none")
    loss, per_layer = early_exit_loss(outs, out.loss, batch["labels"], lambda h: head(norm(h)), weights)
    labels = batch["labels"]
    expected = 0.0
    for idx, w in enumerate(weights):
        logits = head(norm(outs[idx])) if idx < len(layers) - 1 else out.logits  # (B, Q, V)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
        expected = expected + w * ce
        if w:
            assert per_layer[idx] == pytest.approx(float(ce), rel=1e-5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(per_layer[len(layers) - 1]))


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_scores_the_positions_that_predict_a_target():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 2], labels[1, 3] = 1, 2, 3  # logits at q predict labels[q + 1]
    expected = sum(F.kl_div(student[b, q].log_softmax(-1), teacher[b, q].log_softmax(-1), log_target=True,
                            reduction="sum") for b, q in [(0, 2), (1, 1), (1, 2)]) / 3
    assert float(distill_kl(student, teacher, labels)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distill_kl(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- one training step
def test_a_distilled_skipped_step_is_ce_plus_w_times_kl_to_full_depth(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=full", "finetune.full_depth_rate=0",
                   "finetune.distill_weight=0.5", "+finetune.schedules={name: hsd, s: 1, min: 0, max: 2}")
    lm, module = make_module(cfg)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    batch = fixed_batch(cfg, lm)
    policy = build_policy("hsd", s=1, min=0, max=2)
    tmax = int(cfg.finetune.skip_max_new_tokens)
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        skipped = forward(module.model, batch, policy, tmax)
        full = forward(module.model, batch).logits
    expected = skipped.loss + 0.5 * distill_kl(skipped.logits, full, batch["labels"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(distill_kl(skipped.logits, full, batch["labels"])) > 1e-3  # the skipped path differs
    assert module.train_steps_skipped == 1


def test_a_layerskip_step_adds_the_exit_losses_on_a_dropout_forward(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "task=finetune", "finetune=layerskip", "finetune.exit_loss.curriculum=none",
                   "finetune.layer_dropout.p_max=1.0", "finetune.layer_dropout.keep_bottom=5", "finetune.lora=null",
                   "finetune.mode=full")
    lm, module = make_module(cfg)
    logged = {}
    monkeypatch.setattr(module, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    monkeypatch.setattr(module, "log_dict", lambda d, **kw: logged.update({k: float(v) for k, v in d.items()}))
    batch = fixed_batch(cfg, lm)
    model = unwrap(module.model)
    L = len(decoder_layers(model))
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        with layer_outputs(decoder_layers(model)) as outs:
            out = forward(model, batch, EarlyExit(layer=L - 1))  # keep_bottom=L-1, p_max=1: the top layer drops
        expected, _ = early_exit_loss(outs, out.loss, batch["labels"], readout(model), exit_weights(L, 0, 1.0, "none"))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert logged["train/loss_dropout"] == pytest.approx(float(out.loss), rel=1e-5)
    assert {f"train/exit_ce_l{i}" for i in range(2, L + 1)} <= set(logged)


def _tiny(tmp_path):
    from hsd_exp import tasks

    return tasks.build(make_cfg(tmp_path).model)
