from dataclasses import dataclass

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.skip.policies import HSD, POLICIES, Policy, SkipDecode, band_size, build_policy, policy_class

from helpers import ABLATIONS, PAPER_GRID


def one_indexed(layers):
    return {i + 1 for i in layers}


def test_band_size_is_linear_from_max_to_min():
    assert band_size(0, 100, 10, 20) == 20
    assert band_size(50, 100, 10, 20) == 15
    assert band_size(100, 100, 10, 20) == 10
    assert band_size(150, 100, 10, 20) == 10  # clamped past Tmax


def test_skipdecode_runs_the_top_band():
    p = SkipDecode(min=10, max=20)
    # T=0: n=20, run i >= 36-20=16 -> layers 16..36
    assert one_indexed(p.layers(0, 100, 36)) == set(range(16, 37))
    # T=Tmax: n=10 -> i >= 26
    assert one_indexed(p.layers(100, 100, 36)) == set(range(26, 37))
    # fractional n: T=25 -> n=17.5 -> i >= 18.5 -> i >= 19
    assert min(one_indexed(p.layers(25, 100, 36))) == 19


def test_hsd_is_evenly_spaced_layers_plus_band():
    p = HSD(s=1, min=0, max=18)
    evens = set(range(2, 37, 2))
    assert one_indexed(p.layers(0, 100, 36)) == evens | set(range(18, 37))
    assert one_indexed(p.layers(100, 100, 36)) == evens  # band shrank to {36}, which is even
    p2 = HSD(s=2, min=0, max=8)
    assert one_indexed(p2.layers(100, 100, 30)) == set(range(3, 31, 3))
    assert 1 not in one_indexed(p.layers(0, 100, 36))  # HSD s>=1 always skips layer 1


def test_keep_first_adds_the_bottom_layers_and_nothing_else():
    for name, params in ABLATIONS:
        k = params["keep_first"]
        paper = build_policy(name, **{**params, "keep_first": 0})
        variant = build_policy(name, **params)
        for t in (0, 10, 64):
            assert one_indexed(variant.layers(t, 64, 30)) == one_indexed(paper.layers(t, 64, 30)) | set(range(1, k + 1))
    assert build_policy("hsd", s=1, keep_first=2).label == "hsd(s=1,0,18,keep_first=2)"
    assert build_policy("hsd", s=1).label == "hsd(s=1,0,18)"  # the paper's policy keeps the paper's label


@pytest.mark.parametrize("name,params", PAPER_GRID + ABLATIONS)
@pytest.mark.parametrize("num_layers", [30, 32, 36])
def test_static_policies_are_monotone(name, params, num_layers):
    """The set run at T+1 is a subset of the set run at T: the property that keeps the KV cache exact."""
    policy = build_policy(name, num_layers=num_layers, **params)
    tmax = 64
    prev = set(range(num_layers))
    for t in range(tmax + 1):
        cur = set(policy.layers(t, tmax, num_layers))
        assert cur <= prev, (t, cur - prev)
        assert cur, "every token runs at least one layer"
        assert list(policy.layers(t, tmax, num_layers)) == sorted(cur)
        prev = cur


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("hsd", {"s": -1}, "policy.s=-1"),
        ("hsd", {"s": 1, "min": 12, "max": 8}, "policy.min=12 > policy.max=8"),
        ("hsd", {"s": 1, "min": 0, "max": 40}, "policy.max=40 is out of range: must be <= L=36"),
        ("skipdecode", {"min": -1, "max": 8}, "policy.min=-1 is out of range"),
        ("calm", {"d": 0}, "policy.d=0 is out of range"),
        ("calm", {"d": -0.1}, "policy.d=-0.1"),
        ("calm", {"criterion": "entropy"}, "policy.criterion=entropy"),
        ("nope", {}, "policy.name=nope is unknown"),
        ("hsd", {"q": 1}, "has no parameter(s) q"),
        ("hsd", {"keep_first": -1}, "policy.keep_first=-1 is out of range"),
        ("skipdecode", {"keep_first": 40}, "policy.keep_first=40 is out of range: must be <= L=36"),
    ],
)
def test_bad_parameters_fail_with_a_clear_message(name, params, needle):
    with pytest.raises(ConfigError) as err:
        build_policy(name, num_layers=36, **params)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("hsd", {"max": "abc"}, "policy.max=abc is not a finite number: must be a number with 0 <= min <= max <= L=36"),
        ("skipdecode", {"min": "ten"}, "policy.min=ten is not a finite number"),
        ("skipdecode", {"max": None}, "policy.max=None is not a finite number"),
        ("hsd", {"max": float("nan")}, "policy.max=nan is not a finite number"),
        ("hsd", {"min": True}, "policy.min=True is not a finite number"),
        ("calm", {"d": "abc"}, "policy.d=abc is not a finite number: must be a number > 0"),
        ("calm", {"first_exit": "abc"}, "policy.first_exit=abc is out of range: must be an integer >= 1"),
        ("calm", {"first_exit": 0}, "policy.first_exit=0 is out of range: must be an integer >= 1"),
        ("calm", {"first_exit": 1.5}, "policy.first_exit=1.5 is out of range: must be an integer >= 1"),
        ("calm", {"first_exit": 40}, "policy.first_exit=40 is out of range: must be in [1, 36]"),
        ("calm", {"tau": "fast"}, "policy.tau=fast is not a finite number: must be a number >= 0"),
        ("calm", {"tau": -1.0}, "policy.tau=-1 is out of range: must be >= 0"),
        ("calm", {"decay": "no"}, "policy.decay='no' must be true or false"),
        ("hsd", {"max": 40}, "must be <= L=36 (the model's layers, model.num_layers; read from config.json"),
    ],
)
def test_mistyped_parameters_fail_with_a_clear_message(name, params, needle):
    """CLI overrides arrive as strings (``policy.max=abc``): a ConfigError naming the value, not a TypeError."""
    with pytest.raises(ConfigError) as err:
        build_policy(name, num_layers=36, **params)
    assert needle in str(err.value)


def test_band_holds_floor_n_plus_one_layers():
    """The docstrings' arithmetic: the band starts at ceil(L - n(T)), so it holds floor(n(T)) + 1 layers."""
    p = SkipDecode(min=10, max=20)
    assert (len(p.layers(0, 64, 30)), len(p.layers(64, 64, 30))) == (21, 11)
    for t in range(65):
        assert len(p.layers(t, 64, 30)) == int(band_size(t, 64, 10, 20)) + 1


@pytest.mark.parametrize("name,params,label,display,family,variant", [
    ("full", {}, "full", "Full", "Full", False),
    ("calm", {"d": 0.02}, "calm(d=0.02,softmax)", "CALM (d=0.02)", "CALM", False),
    ("calm", {"d": 0.005, "criterion": "state"}, "calm(d=0.005,state)", "CALM (d=0.005, state)", "CALM (state)", True),
    ("calm", {"first_exit": 3, "decay": True}, "calm(d=0.02,softmax,first_exit=3,decay(tau=4))",
     "CALM (d=0.02, first_exit=3, decay(tau=4))", "CALM (first_exit=3, decay(tau=4))", True),
    ("skipdecode", {"min": 10, "max": 20}, "skipdecode(10,20)", "SkipDecode (10,20)", "SkipDecode", False),
    ("skipdecode", {"keep_first": 1}, "skipdecode(10,20,keep_first=1)", "SkipDecode (10,20, keep_first=1)",
     "SkipDecode (keep_first=1)", True),
    ("hsd", {"s": 1, "min": 0, "max": 18}, "hsd(s=1,0,18)", "HSD (s=1, 0, 18)", "HSD s=1", False),
    ("hsd", {"s": 2, "min": 0.0, "max": 12.0}, "hsd(s=2,0,12)", "HSD (s=2, 0, 12)", "HSD s=2", False),
    ("hsd", {"s": 1, "keep_first": 2}, "hsd(s=1,0,18,keep_first=2)", "HSD (s=1, 0, 18, keep_first=2)",
     "HSD s=1 (keep_first=2)", True),
])
def test_policies_name_themselves(name, params, label, display, family, variant):
    """The run label (folders, W&B names) and the report's row and plot line, as the papers name them; a
    variant (options beyond the paper's setting) is drawn as a line of its own."""
    policy = build_policy(name, **params)
    assert (policy.label, policy.display_name, policy.plot_line, policy.variant) == (label, display, family, variant)


def test_the_registry_holds_every_policy_in_report_order():
    assert list(POLICIES) == ["full", "skipdecode", "hsd", "calm", "early_exit", "skiplayer"]
    assert sorted(POLICIES, key=lambda n: POLICIES[n].order) == ["full", "calm", "skipdecode", "hsd", "skiplayer",
                                                                  "early_exit"]
    assert [n for n, cls in POLICIES.items() if cls.baseline] == ["full"]
    assert [n for n, cls in POLICIES.items() if not cls.static] == ["calm", "skiplayer"]
    assert policy_class("hsd") is HSD and policy_class("nope") is None and policy_class(None) is None


def test_each_policy_names_its_kind_and_static_follows_it():
    """The engine dispatches on ``kind`` (hsd_exp.skip.modes); the flags it replaced are refused, not ignored."""
    assert {n: cls.kind for n, cls in POLICIES.items() if cls.kind != "static"} == {"calm": "per_step",
                                                                                   "skiplayer": "per_token"}
    assert all(cls.static == (cls.kind == "static") for cls in POLICIES.values())
    with pytest.raises(TypeError, match="sets static/per_token: set kind"):
        @dataclass(frozen=True)
        class Flagged(Policy):
            static = False
    with pytest.raises(TypeError, match="kind='sometimes': choose one of static, per_step, per_token"):
        @dataclass(frozen=True)
        class Odd(Policy):
            kind = "sometimes"


def test_a_name_already_taken_is_refused():
    with pytest.raises(ValueError, match="policy name 'hsd' is taken by hsd_exp.skip.policies.HSD"):
        @dataclass(frozen=True)
        class Other(Policy):
            name = "hsd"
    assert POLICIES["hsd"] is HSD


def test_unknown_parameter_lists_only_the_dataclass_fields():
    with pytest.raises(ConfigError, match=r"has no parameter\(s\) order; valid: s, min, max, keep_first$"):
        build_policy("hsd", order=1)


def test_config_label_and_the_wandb_name_resolver():
    from omegaconf import OmegaConf

    import hsd_exp  # noqa: F401  (registers ${hsd_policy_label:...})
    from hsd_exp.skip.policies import config_label

    node = {"_target_": "hsd_exp.build_policy", "name": "hsd", "s": 1, "min": 0, "max": 18, "keep_first": 2}
    assert config_label(node) == "hsd(s=1,0,18,keep_first=2)"
    assert config_label({"name": "hsd", "s": -1}) is None  # invalid: no label, no exception
    cfg = OmegaConf.create({"policy": node, "run_name": "${hsd_policy_label:${policy}}"})
    assert cfg.run_name == "hsd(s=1,0,18,keep_first=2)"
    assert OmegaConf.create({"policy": {"name": "full"}, "n": "${hsd_policy_label:${policy}}"}).n == "full"


def test_early_exit_runs_the_bottom_e_layers_for_every_token():
    policy = build_policy("early_exit", layer=4)
    assert all(policy.layers(t, 10, 6) == (0, 1, 2, 3) for t in range(12))  # monotone: the same set always
    assert policy.label == "early_exit(E=4)" and policy.display_name == "Early exit (E=4)"
    with pytest.raises(ConfigError, match=r"policy.layer=7 is out of range: must be an integer in \[1, L=6\]"):
        build_policy("early_exit", num_layers=6, layer=7)
    with pytest.raises(ConfigError, match="policy.layer=0 is out of range"):
        build_policy("early_exit", layer=0)
