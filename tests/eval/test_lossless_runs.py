"""decode=lossless through the CLI: its predictions are greedy full decoding's, and metrics.json says what the
drafts cost (acceptance, tokens per verification); settings it cannot reproduce stop before the model loads."""

import json
from pathlib import Path

import pytest

from hsd_exp import preflight, tasks
from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import read_predictions
from hsd_exp.report.runs import collect_runs
from hsd_exp.report.tables import write_report

from helpers import compose_config

BASE = ["model=tiny-llama", "dataset.path=sample", "dataset.limit=5", "bertscore.enabled=false", "decode.batch_size=3",
        "decode.max_new_tokens=10", "task=evaluate", "logger=csv", "callbacks=none", "trainer.accelerator=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lossless_predictions_are_full_decodings(tmp_path):
    full = tasks.run(compose_config(tmp_path / "full", *BASE, "policy=full"))
    out = tasks.run(compose_config(tmp_path / "ll", *BASE, "policy=hsd", "policy.max=4", "decode=lossless",
                                   "decode.draft_len=3"))
    texts = {p["id"]: p["prediction"] for p in read_predictions(tmp_path / "full" / "predictions.jsonl")}
    assert {p["id"]: p["prediction"] for p in read_predictions(tmp_path / "ll" / "predictions.jsonl")} == texts
    metrics = json.loads((tmp_path / "ll" / "metrics.json").read_text())
    assert metrics["lossless"] is True and metrics["draft_len"] == 3
    assert 0 <= metrics["acceptance"] <= 1 and metrics["tokens_per_verification"] >= 1
    assert metrics["draft_avg_layers"] < 6  # the drafts skipped; the output did not
    assert out["avg_layers"] == full["avg_layers"] == 6
    assert out["rougeL"] == full["rougeL"]
    report = Path(write_report(collect_runs([str(tmp_path)]), tmp_path / "report")["md"]).read_text()
    assert "HSD (s=1, 0, 4) → lossless (k=3, acceptance " in report  # the mode is named, the policy drafted
    assert "all 5 predictions identical to its Full run's, as promised" in report  # and the report checked it


@pytest.mark.parametrize(("override", "message"), [
    ("decode.num_beams=4", "decode=lossless needs num_beams=1"),
    ("decode.draft_len=0", "decode.draft_len=0 must be a positive integer"),
    ("decode.draft_confidence=1.5", "decode.draft_confidence=1.5 is out of range"),
])
def test_lossless_refuses_beams_and_bad_draft_len_before_loading(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        preflight.check(compose_config(tmp_path, *BASE, "policy=hsd", "policy.max=4", "decode=lossless", override))
