"""predictions.jsonl streaming and resume after a crash; atomic metrics.json."""

import json
import math
import os

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import PredictionWriter, examples_hash, read_predictions, write_metrics


def record(i: int) -> dict:
    return {
        "id": f"ex{i}",
        "source": f"source {i} — ünïcode",
        "references": [f"ref {i}", f"alt {i}"],
        "prediction": f"prediction {i}",
        "layers_per_token": [12, 8, i],
    }


def run(run_dir, ids, crash_after=None):
    """A decode loop as the evaluation job runs it: skip done ids, write the rest; count the work."""
    computed = []
    with PredictionWriter(run_dir) as writer:
        for i in ids:
            if f"ex{i}" in writer.done_ids():
                continue
            if crash_after is not None and len(computed) == crash_after:
                raise KeyboardInterrupt  # killed mid-run
            computed.append(i)
            writer.write(**record(i))
    return computed


def test_write_and_read(tmp_path):
    assert run(tmp_path, range(3)) == [0, 1, 2]
    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [record(i) for i in range(3)]
    assert (
        read_predictions(tmp_path)
        == read_predictions(tmp_path / "predictions.jsonl")
        == [record(i) for i in range(3)]
    )
    assert read_predictions(tmp_path / "missing") == []


def test_each_record_is_on_disk_before_the_next(tmp_path):
    with PredictionWriter(tmp_path) as writer:
        writer.write(**record(0))
        assert read_predictions(tmp_path) == [record(0)]  # flushed, not buffered
        assert writer.done_ids() == {"ex0"}


def test_resume_after_crash_with_torn_last_line(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, range(10), crash_after=4)
    file = tmp_path / "predictions.jsonl"
    with open(file, "a", encoding="utf-8") as f:  # the crash tore the 5th line mid-write
        f.write(json.dumps(record(4))[:25])
    assert [r["id"] for r in read_predictions(tmp_path)] == ["ex0", "ex1", "ex2", "ex3"]

    computed = run(tmp_path, range(10))
    assert computed == [4, 5, 6, 7, 8, 9]  # nothing recomputed, nothing lost
    assert read_predictions(tmp_path) == [record(i) for i in range(10)]
    assert all(json.loads(line) for line in file.read_text(encoding="utf-8").splitlines())
    assert run(tmp_path, range(10)) == []  # a finished run does nothing


def test_resume_keeps_a_complete_last_record_without_newline(tmp_path):
    file = tmp_path / "predictions.jsonl"
    file.write_text(json.dumps(record(0)) + "\n" + json.dumps(record(1)), encoding="utf-8")
    assert run(tmp_path, range(3)) == [2]
    assert read_predictions(tmp_path) == [record(i) for i in range(3)]


def test_corrupt_line_in_the_middle_is_a_config_error(tmp_path):
    file = tmp_path / "predictions.jsonl"
    file.write_text(json.dumps(record(0)) + "\n{not json\n" + json.dumps(record(2)) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2"):
        PredictionWriter(tmp_path)


def test_write_metrics_is_atomic_and_json_safe(tmp_path):
    path = write_metrics(tmp_path / "run", {"rouge1": 12.5, "bertscore_f1": math.nan, "complete": True})
    assert json.loads(path.read_text()) == {"rouge1": 12.5, "bertscore_f1": None, "complete": True}
    write_metrics(tmp_path / "run", {"rouge1": 13.0})  # replaces, leaves no temp files
    assert json.loads(path.read_text()) == {"rouge1": 13.0}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json"]


def test_metrics_json_follows_the_umask(tmp_path):
    """mkstemp writes 0600; metrics.json must be as readable as the predictions beside it."""
    import stat

    old = os.umask(0o022)
    try:
        path = write_metrics(tmp_path, {"rougeL": 1.0})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_examples_hash_names_the_examples_whatever_their_order():
    """metrics.json's examples_hash: the same (id, source, references) in any order (DDP ranks, resume) give one
    hash; another source, reference or example set (another file, another limit) another; predictions do not."""
    records = [record(i) for i in range(4)]
    same = examples_hash(records)
    assert examples_hash(records[::-1]) == same
    assert examples_hash([dict(r, prediction="other", layers_per_token=[1]) for r in records]) == same
    assert examples_hash(records[:3]) != same
    assert examples_hash([dict(records[0], source="news"), *records[1:]]) != same
    assert examples_hash([dict(records[0], references=["another"]), *records[1:]]) != same
    assert len(same) == 16 and int(same, 16) >= 0
