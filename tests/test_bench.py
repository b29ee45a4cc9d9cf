"""The speed benchmark's arithmetic and plumbing (not its timings: benchmarks are commands, not tests)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hsd_exp.bench import HEAD, Lossless, bench_policy, bench_setting, calls_per_setting, check_router_source
from hsd_exp.bench_prompts import prompt_format, trained_format
from hsd_exp.bench_table import ABOVE_IDEAL, CSV_COLUMNS, above_ideal, render, to_csv
from hsd_exp.data.prompts import build_prompt
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
                         new_tokens=8, repeats=1, natural=False)
    assert [r["policy"] for r in rows[1:]] == ["hsd(s=1,0,4) lossless(k=3)", "full lossless(k=3)"]
    assert all(r["identical"] for r in rows[1:])  # plain generate()'s tokens, checked in the run
    assert all(r["decode"] == "lossless" and r["length"] == "fixed" for r in rows[1:])
    full = rows[2]
    assert full["acceptance"] == 1.0 and full["tokens_per_verification"] == pytest.approx(7 / 2)
    # HSD skips layer 1: every layer verifies; a full-depth draft's layers 1..5 are exact: only layer 6 does
    assert rows[1]["verify_avg_layers"] == 6 and full["verify_avg_layers"] == 1
    # a full-depth draft accepted every time: each of the 7 tokens costs one full-depth forward, a draft or a
    # verification (layer 6 + head, plus the last draft's pass through layers 1..5), so at best it ties plain;
    # counting each verified position as a token's step (the old "ideal") put it below
    assert full["decode_ideal_speedup"] == pytest.approx(1.0) and full["decode_flop_ratio"] < 0.9
    # the bound counts each verify forward once, the FLOP ratio its 4 positions: the bound is the larger
    assert all(r["decode_ideal_speedup"] > r["decode_flop_ratio"] for r in rows[1:])
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
    table = (tmp_path / "bench.md").read_text()
    assert "measured/ideal" in table
    import csv

    with open(tmp_path / "bench.csv", newline="") as f:  # one csv row per table row, snake_case columns
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == CSV_COLUMNS and len(lines) == len(rows) == table.count("\n") - 2
    assert {"model", "adapter", "policy", "batch_size", "decode", "measured_speedup", "ideal_speedup", "acceptance",
            "tokens", "dtype"} <= set(lines[0])
    assert [(x["policy"], x["num_beams"], x["dtype"]) for x in lines] == [
        (r["policy"], str(r["num_beams"]), "float32") for r in rows]
    assert to_csv(rows) == (tmp_path / "bench.csv").read_text()
    # the table once (its rows as each setting is measured), not once per setting and again at the end
    assert ok.stdout.count(HEAD) == 1 and ok.stdout.count("hsd(s=1,0,4)") == 2, ok.stdout

    bad = subprocess.run([*base, "bench.policies=[{name:hsd,s:1,min:0,max:9}]", f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "policy.max=9" in bad.stderr
    bad = subprocess.run([*base, "bench.statistic=mean", f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bench.statistic='mean'" in bad.stderr
    # the E2E adapter was trained without the chat template: prompting it with one is refused before loading
    adapter = ROOT / "hsd_exp" / "weights" / "smollm2_e2e_robust"
    bad = subprocess.run([*base, "bench.policies=[{name:full}]", "model.chat=true", f"bench.adapter={adapter}",
                          f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "trained with model.chat=false" in bad.stderr, bad.stderr[-2000:]


def test_runner_order_rotates_each_repeat():
    """In one fixed order plain generate() always ran right after the short prefill call and each policy after
    the same neighbour; repeat r now starts at runner r."""
    lm = load("tiny-gpt2")
    policies = [build_policy("full"), build_policy("hsd", s=1, min=0, max=4)]
    calls = []
    bench_setting(lm, policies, batch_size=1, beams=1, new_tokens=3, repeats=3, progress=calls.append)
    order = ["prefill", "plain generate()", "full", "hsd(s=1,0,4)"]
    assert calls[4:8] == order and calls[8:12] == order[1:] + order[:1] and calls[12:16] == order[2:] + order[:2]


def test_a_shipped_adapter_is_prompted_as_its_preset_trained_it(tmp_path):
    """The E2E adapters were trained with model.chat=false (source + the dataset's separator), so the bench
    builds their prompts so, whatever the base model's chat setting, and refuses an override that disagrees."""
    fmt = prompt_format(True, "smollm2_e2e_robust", chat_overridden=False)
    assert not fmt.chat and fmt.origin == "conf/experiment/smollm2_e2e_robust.yaml"
    assert fmt.dataset["separator"] == "\n\nDescription:" and fmt.dataset["path"] == "sample"
    assert prompt_format(True, None, chat_overridden=False).chat  # no adapter: the model's own format
    with pytest.raises(ConfigError, match="model.chat=true but adapter smollm2_e2e_robust was trained with "
                                          "model.chat=false"):
        prompt_format(True, "smollm2_e2e_robust", chat_overridden=True)
    # a run folder's hf_model: the run's own config says
    run = tmp_path / "run"
    (run / "hf_model").mkdir(parents=True)
    (run / "hf_model" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no run config"):
        trained_format(str(run / "hf_model"))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "model: {chat: true}\ndataset: {name: common_gen, path: '${paths.data_dir}/x', instruction: Use them.,"
        " source_field: concepts, target_field: target, group_by: concept_set_idx, source_join: ', '}\n")
    fmt = trained_format(str(run / "hf_model"))
    assert fmt.chat and fmt.dataset_name == "common_gen" and fmt.dataset["path"] == "sample"


def test_bench_prompts_are_built_in_the_adapters_format_not_the_models():
    """conf/bench.yaml loads smollm2-135m with chat: true; the E2E adapter's rows must still get its own
    source + separator prompts, built by evaluation's code."""
    import dataclasses

    lm = load("tiny-llama")
    tok = lm.tokenizer
    chat_lm = dataclasses.replace(lm, chat=True)  # as the bench's model config says for SmolLM2
    before = tok.chat_template  # the session-cached tokenizer: put back what it had (deleting it breaks save_pretrained)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    try:
        fmt = prompt_format(True, "smollm2_e2e_robust", chat_overridden=False)
        rows = bench_setting(chat_lm, [build_policy("full")], batch_size=1, beams=1, new_tokens=2, repeats=1,
                             fmt=fmt, adapter="smollm2_e2e_robust")
        chat_rows = bench_setting(chat_lm, [build_policy("full")], batch_size=1, beams=1, new_tokens=2, repeats=1)
    finally:
        tok.chat_template = before
    from hsd_exp.data.loaders import load_examples

    source = load_examples(fmt.dataset, split="test", limit=1)[0].source
    expected = tok(build_prompt(source, fmt.dataset, tok, chat=False))["input_ids"]  # BOS rule: chat=false adds
    assert rows[0]["prompt_len"] == len(expected) and not rows[0]["prompt_chat"]
    assert rows[0]["adapter"] == "smollm2_e2e_robust" and rows[0]["prompt_format"] == fmt.origin
    assert chat_rows[0]["prompt_chat"] and chat_rows[0]["prompt_len"] != rows[0]["prompt_len"]


def test_lossless_rows_also_run_at_natural_length():
    """Acceptance on forced 8-token rows is not acceptance on real answers: with EOS allowed, rows stop, and the
    lossless row still returns plain generate()'s tokens (at natural length)."""
    lm = load("tiny-llama")
    tok = lm.tokenizer
    draft = Lossless(build_policy("hsd", s=1, min=0, max=4), 3)
    rows = bench_setting(lm, [draft], batch_size=2, beams=1, new_tokens=8, repeats=1)
    fixed_tokens = rows[0]["tokens"]
    # the token plain greedy writes third in the first row becomes EOS: that row stops after 3 tokens
    with torch.no_grad():
        plain = lm.model.generate(**rows_inputs(lm, 2), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    prompt_len = rows[0]["prompt_len"]
    eos = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(int(plain[0, prompt_len + 2]))
    try:
        rows = bench_setting(lm, [draft], batch_size=2, beams=1, new_tokens=8, repeats=1)
    finally:
        tok.eos_token = eos
    natural = [r for r in rows if r["length"] == "natural"]
    assert [r["policy"] for r in natural] == ["plain generate()", "hsd(s=1,0,4) lossless(k=3)"]
    assert natural[1]["identical"] and 0 <= natural[1]["acceptance"] <= 1
    assert natural[0]["tokens"] == natural[1]["tokens"] < fixed_tokens == 16
    assert [r["length"] for r in rows].count("fixed") == 2


def rows_inputs(lm, batch_size):
    """The bench's own inputs for the tiny model (its E2E prompts, chat=false)."""
    from hsd_exp.bench_prompts import prompts_for

    fmt = prompt_format(False, None, False)
    return lm.tokenizer(prompts_for(fmt, lm.tokenizer, batch_size), return_tensors="pt", padding=True)


def test_a_row_above_its_bound_is_flagged_not_printed_plain():
    """Speedups are held to the decode-step bound B; the whole call, which adds the same prefill to both
    sides, to max(1, B). More than 5% above: 'above ideal: noise or bug'."""
    row = {"model": "m", "adapter": "", "batch_size": 1, "num_beams": 1, "decode": "greedy", "length": "fixed",
           "policy": "p", "avg_layers": 18.0, "tokens": 64, "tokens_per_s": 10.0, "decode_efficiency": 1.0}
    fine = {**row, "measured_speedup": 1.10, "decode_measured_speedup": 1.14, "decode_ideal_speedup": 1.10}
    assert not above_ideal(fine)  # within 5%
    assert above_ideal({**fine, "decode_measured_speedup": 1.16})  # SmolLM2's full row read up to 1.094 over 1.0
    assert above_ideal({**fine, "decode_measured_speedup": None, "measured_speedup": 1.2})
    # a lossless row slower than plain by its bound (B = 0.8): its call may still read 1.0, not above max(1, B)
    assert not above_ideal({**fine, "measured_speedup": 1.0, "decode_measured_speedup": 0.8,
                            "decode_ideal_speedup": 0.8})
    flagged = {**fine, "decode_measured_speedup": 1.3, "note": ABOVE_IDEAL}
    assert render([flagged], head=False).endswith(f"| {ABOVE_IDEAL} |")
