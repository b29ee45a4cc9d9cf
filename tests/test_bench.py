"""The speed benchmark's arithmetic and plumbing (not its timings: benchmarks are commands, not tests)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hsd_exp.bench import HEAD, Lossless, bench_policy, bench_setting, calls_per_setting, check_router_source
from hsd_exp.errors import ConfigError
from hsd_exp.skip.policies import build_policy

from helpers import CACHE_DIR, ROOT, load

pytestmark = pytest.mark.usefixtures("one_thread")


def test_skiplayer_rows_need_a_router_named_before_the_model_loads(tmp_path):
    rows = [build_policy("full"), build_policy("skiplayer", threshold=0.5)]
    with pytest.raises(ConfigError, match="skiplayer row but no router: set bench.router="):
        check_router_source(None, None, rows)
    with pytest.raises(ConfigError, match=f"bench.router={tmp_path} holds no router"):
        check_router_source(str(tmp_path), None, rows)
    with pytest.raises(ConfigError, match="holds no LoRA adapter"):
        check_router_source(None, str(tmp_path), rows)
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "router.json").write_text("{}")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert check_router_source(None, str(tmp_path), rows) == tmp_path / "router"  # the adapter's own router
    assert check_router_source(None, None, rows[:1]) is None  # no SkipLayer row: no router needed


@pytest.mark.parametrize(("beams", "statistic"), [(1, "min"), (4, "median")])
def test_bench_setting_reports_every_policy(beams, statistic):
    lm = load("tiny-gpt2")
    policies = [build_policy("full"), build_policy("hsd", s=1, min=0, max=4)]
    rows = bench_setting(lm, policies, batch_size=2, beams=beams, new_tokens=5, repeats=2, statistic=statistic)
    assert [r["policy"] for r in rows] == ["plain generate()", "full", "hsd(s=1,0,4)"]
    plain, full, hsd = rows
    assert plain["measured_speedup"] == 1.0 and plain["ideal_speedup"] == 1.0
    assert full["avg_layers"] == 6 and full["ideal_speedup"] == pytest.approx(1.0)
    assert hsd["avg_layers"] < 6 and hsd["ideal_speedup"] > 1.0
    # decode steps alone: the prefill (the same for all) is taken off, so the ideal is larger
    assert plain["decode_ideal_speedup"] == 1.0 and hsd["decode_ideal_speedup"] > hsd["ideal_speedup"]
    assert all(r["prefill_seconds"] > 0 and "decode_efficiency" in r for r in rows)  # timings: not asserted
    assert all(r["num_beams"] == beams and r["tokens_per_s"] > 0 for r in rows)


def test_bench_setting_times_a_router_with_its_flops_per_layer():
    from hsd_exp import SkipRouter

    lm = load("tiny-llama")
    torch.manual_seed(0)
    router = SkipRouter.for_model(lm.model, kind="linear", init_bias=0.0).eval()
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.3)
    policies = [build_policy("skiplayer", router=router)]
    rows = bench_setting(lm, policies, batch_size=3, beams=1, new_tokens=5, repeats=1)
    routed = rows[1]
    assert 0 < routed["avg_layers"] < 6 and routed["ideal_speedup"] > 1.0


def test_lossless_rows_check_their_tokens_and_count_drafts_and_verifications():
    lm = load("tiny-llama")
    hsd = build_policy("hsd", s=1, min=0, max=4)
    rows = bench_setting(lm, [Lossless(hsd, 3), Lossless(build_policy("full"), 3)], batch_size=2, beams=1,
                         new_tokens=8, repeats=1)
    assert [r["policy"] for r in rows[1:]] == ["hsd(s=1,0,4) lossless(k=3)", "full lossless(k=3)"]
    assert all(r["identical"] for r in rows[1:])  # plain generate()'s tokens, checked in the run
    full = rows[2]
    assert full["acceptance"] == 1.0 and full["tokens_per_verification"] == pytest.approx(7 / 2)
    # HSD skips layer 1: every layer verifies; a full-depth draft's layers 1..5 are exact: only layer 6 does
    assert rows[1]["verify_avg_layers"] == 6 and full["verify_avg_layers"] == 1
    # a full-depth draft only adds work: 7 tokens = 6 drafts + 2 verifications of 4 positions, vs 7 steps
    assert full["decode_ideal_speedup"] < 1.0
    with pytest.raises(ConfigError, match="draft_len=0 must be a positive integer"):
        bench_policy({"name": "hsd", "lossless": True, "draft_len": 0}, 30)
    assert bench_policy({"name": "hsd", "lossless": True}, 30) == Lossless(build_policy("hsd"), 4)
    adaptive = bench_policy({"name": "hsd", "lossless": True, "draft_confidence": 0.5}, 30)
    assert adaptive == Lossless(build_policy("hsd"), 4, 0.5) and adaptive.label.endswith("lossless(k=4,c=0.5)")
    with pytest.raises(ConfigError, match="draft_confidence=2 is out of range"):
        bench_policy({"name": "hsd", "lossless": True, "draft_confidence": 2}, 30)


def test_bench_setting_reports_progress_outside_the_timed_calls():
    """The benchmark showed no progress: ``progress(label)`` after every call, warm-ups included."""
    lm = load("tiny-gpt2")
    policies = [build_policy("full"), build_policy("hsd", s=1, min=0, max=4)]
    calls = []
    bench_setting(lm, policies, batch_size=1, beams=1, new_tokens=3, repeats=2, progress=calls.append)
    assert len(calls) == calls_per_setting(len(policies), 2) == 12
    assert calls[:4] == ["prefill", "plain generate()", "full", "hsd(s=1,0,4)"]


def test_bench_cli_writes_its_tables_and_rejects_bad_policies(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HSD_CACHE_DIR": CACHE_DIR, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "hsd_exp.bench", "model=tiny-llama", "bench.batch_sizes=[1]",
            "bench.num_beams=[1,4]", "bench.max_new_tokens=4", "bench.repeats=1"]
    ok = subprocess.run([*base, "bench.policies=[{name:full},{name:hsd,s:1,min:0,max:4}]",
                         f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["num_beams"], r["policy"]) for r in rows} == {
        (b, p) for b in (1, 4) for p in ("plain generate()", "full", "hsd(s=1,0,4)")}
    assert "measured/ideal" in (tmp_path / "bench.md").read_text()
    # the table once (its rows as each setting is measured), not once per setting and again at the end
    assert ok.stdout.count(HEAD) == 1 and ok.stdout.count("hsd(s=1,0,4)") == 2, ok.stdout

    bad = subprocess.run([*base, "bench.policies=[{name:hsd,s:1,min:0,max:9}]", f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "policy.max=9" in bad.stderr
    bad = subprocess.run([*base, "bench.statistic=mean", f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bench.statistic='mean'" in bad.stderr
