"""Dataset loaders on small fixtures in each dataset's real formats, the bundled samples, and errors."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsd_exp.data.loaders import Example, load_examples, sample_dir, split_indices
from hsd_exp.errors import ConfigError

from helpers import dataset_cfg as cfg

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "dataset"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# -----------------------------------------------------------------------------
# every loader, real formats


E2E_ROWS = [  # original release: one row per reference, not contiguous, quoted commas and a newline
    ["name[Blue Spice], eatType[pub]", "Blue Spice is a pub."],
    ["name[Alimentum], area[city centre]", "Alimentum is in the city centre."],
    ["name[Blue Spice], eatType[pub]", 'There is a pub, "Blue Spice".'],
    ["name[Café Rouge], food[French]", "Café Rouge serves French food,\nnear the river."],
]


def test_e2e_original_csv(tmp_path):
    write_csv(tmp_path / "testset_w_refs.csv", ["mr", "ref"], E2E_ROWS)
    examples = load_examples(cfg("e2e", path=str(tmp_path)))
    assert [ex.source for ex in examples] == [
        "name[Blue Spice], eatType[pub]",
        "name[Alimentum], area[city centre]",
        "name[Café Rouge], food[French]",
    ]
    assert examples[0].references == ["Blue Spice is a pub.", 'There is a pub, "Blue Spice".']
    assert examples[2].references == ["Café Rouge serves French food,\nnear the river."]
    assert all(isinstance(ex, Example) for ex in examples)
    assert len({ex.id for ex in examples}) == 3
    # ids are stable: a hash of the MR, the same from the Hub-schema jsonl
    rows = [{"meaning_representation": mr, "human_reference": ref} for mr, ref in E2E_ROWS]
    write_jsonl(tmp_path / "hub" / "test.jsonl", rows)
    assert load_examples(cfg("e2e", path=str(tmp_path / "hub"))) == examples


def test_e2e_dev_and_train_files(tmp_path):
    write_csv(tmp_path / "trainset.csv", ["mr", "ref"], E2E_ROWS[:2])
    write_csv(tmp_path / "devset.csv", ["mr", "ref"], E2E_ROWS[2:])
    assert len(load_examples(cfg("e2e", path=str(tmp_path)), split="train")) == 2
    assert [ex.source for ex in load_examples(cfg("e2e", path=str(tmp_path)), split="validation")] == [
        "name[Blue Spice], eatType[pub]",
        "name[Café Rouge], food[French]",
    ]


def test_common_gen_original_jsonl(tmp_path):
    write_jsonl(
        tmp_path / "commongen.dev.jsonl",
        [
            {"concept_set": "dog#frisbee#catch", "scene": ["A dog catches a frisbee.", "The dog caught it."]},
            {"concept_set": "ski#mountain", "scene": ["Skiing down the mountain."]},
        ],
    )
    examples = load_examples(cfg("common_gen", path=str(tmp_path), split="validation"))
    assert examples == [
        Example("0", "dog, frisbee, catch", ["A dog catches a frisbee.", "The dog caught it."]),
        Example("1", "ski, mountain", ["Skiing down the mountain."]),
    ]


def test_common_gen_hub_schema_groups_by_concept_set(tmp_path):
    rows = [
        {"concept_set_idx": 7, "concepts": ["a", "b"], "target": "t1"},
        {"concept_set_idx": 3, "concepts": ["c"], "target": "t2"},
        {"concept_set_idx": 7, "concepts": ["a", "b"], "target": "t3"},
        {"concept_set_idx": 3, "concepts": ["c"], "target": ""},  # empty reference: dropped
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    examples = load_examples(cfg("common_gen", path=str(tmp_path)), split="train")
    assert examples == [Example("7", "a, b", ["t1", "t3"]), Example("3", "c", ["t2"])]


def test_cnn_dm_csv(tmp_path):
    write_csv(
        tmp_path / "test.csv",
        ["id", "article", "highlights"],
        [["a1", "First article, with a comma.", "First summary."], ["a2", "Second “article”.", "Second."]],
    )
    examples = load_examples(cfg("cnn_dm", path=str(tmp_path)))
    assert examples == [
        Example("a1", "First article, with a comma.", ["First summary."]),
        Example("a2", "Second “article”.", ["Second."]),
    ]


def test_xsum_jsonl_json_csv(tmp_path):
    rows = [{"document": f"doc {i}", "summary": f"sum {i}", "id": str(100 + i)} for i in range(5)]
    write_jsonl(tmp_path / "jsonl" / "test.jsonl", rows)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "test.json").write_text(json.dumps(rows))
    write_csv(tmp_path / "csv" / "test.csv", ["document", "summary", "id"], [list(r.values()) for r in rows])
    expected = [Example(str(100 + i), f"doc {i}", [f"sum {i}"]) for i in range(5)]
    for fmt in ("jsonl", "json", "csv"):
        assert load_examples(cfg("xsum", path=str(tmp_path / fmt))) == expected, fmt


HCM_ROWS = [
    {
        "instruction": "If you are a doctor, please answer the medical questions based on the patient's description.",
        "input": f"Patient question {i}: I have had a headache for {i} days.",
        "output": f"Doctor answer {i}.",
    }
    for i in range(40)
]


def test_healthcaremagic_json_list_derives_splits(tmp_path):
    (tmp_path / "HealthCareMagic-100k.json").write_text(json.dumps(HCM_ROWS))
    conf = cfg("healthcaremagic", path=str(tmp_path))
    splits = {s: load_examples(conf, split=s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [36, 2, 2]
    ids = [ex.id for v in splits.values() for ex in v]
    assert sorted(ids, key=int) == [str(i) for i in range(40)]  # a partition of the rows
    ex = splits["test"][0]
    assert ex.source == HCM_ROWS[int(ex.id)]["input"] and ex.references == [HCM_ROWS[int(ex.id)]["output"]]
    assert load_examples(conf, split="test") == splits["test"]  # deterministic
    # the same split from a Hub-schema train.jsonl (= the Hub's only split)
    write_jsonl(tmp_path / "hub" / "train.jsonl", HCM_ROWS)
    assert load_examples(cfg("healthcaremagic", path=str(tmp_path / "hub"))) == splits["test"]


def test_healthcaremagic_presplit_jsonl(tmp_path):
    for split, rows in (("train", HCM_ROWS[:30]), ("validation", HCM_ROWS[30:35]), ("test", HCM_ROWS[35:])):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    examples = load_examples(cfg("healthcaremagic", path=str(tmp_path)))
    assert [ex.source for ex in examples] == [r["input"] for r in HCM_ROWS[35:]]


def test_split_indices_partition_and_stability():
    parts = split_indices(1000, {"train": 0.9, "validation": 0.05, "test": 0.05}, seed=0)
    assert [len(p) for p in parts.values()] == [900, 50, 50]
    assert sorted(i for p in parts.values() for i in p) == list(range(1000))
    assert parts == split_indices(1000, {"train": 0.9, "validation": 0.05, "test": 0.05}, seed=0)
    assert parts["test"] != split_indices(1000, {"train": 0.9, "validation": 0.05, "test": 0.05}, 1)["test"]


def test_limit_and_split_arguments(tmp_path):
    rows = [{"document": f"d{i}", "summary": f"s{i}", "id": str(i)} for i in range(10)]
    write_jsonl(tmp_path / "test.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:4])
    conf = cfg("xsum", path=str(tmp_path), limit=3)
    assert [ex.id for ex in load_examples(conf)] == ["0", "1", "2"]  # cfg limit
    assert [ex.id for ex in load_examples(conf, limit=5)] == ["0", "1", "2", "3", "4"]  # argument wins
    assert len(load_examples(conf, split="validation", limit=100)) == 4
    assert load_examples(conf, limit=0) == []
    # limit counts examples after grouping
    write_csv(tmp_path / "e2e" / "testset_w_refs.csv", ["mr", "ref"], E2E_ROWS)
    grouped = load_examples(cfg("e2e", path=str(tmp_path / "e2e")), limit=1)
    assert len(grouped) == 1 and len(grouped[0].references) == 2


def test_plain_dict_config(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"q": "x", "a": "y"}])
    conf = {"name": "custom", "path": str(tmp_path), "source_field": "q", "target_field": "a"}
    assert load_examples(conf) == [Example("0", "x", ["y"])]


# -----------------------------------------------------------------------------
# bundled samples


@pytest.mark.parametrize("name,n_test", [("e2e", 25), ("common_gen", 43)])
def test_bundled_samples(name, n_test):
    test = load_examples(cfg(name, path="sample"))
    train = load_examples(cfg(name, path="sample"), split="train")
    assert len(test) == n_test and len(train) > n_test
    assert all(ex.references and ex.source for ex in test + train)
    assert sum(len(ex.references) for ex in test) <= 200
    assert sum(p.stat().st_size for p in sample_dir(name).rglob("*")) < 500_000


# -----------------------------------------------------------------------------
# errors: one ConfigError with the fix


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.path=.*does not exist.*dataset.path=DIR"):
        load_examples(cfg("xsum", path=str(tmp_path / "nope")))


def test_missing_split_names_existing_ones(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s", "id": "1"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"document": "d", "summary": "s", "id": "1"}])
    with pytest.raises(ConfigError, match=r"split 'test' not found.*\['train', 'validation'\]"):
        load_examples(cfg("xsum", path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"splits: \['test', 'train', 'validation'\]"):
        load_examples(cfg("healthcaremagic", path=str(tmp_path)), split="dev")


def test_missing_field_names_columns(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "d", "summary": "s", "id": "1"}])
    with pytest.raises(ConfigError, match=r"dataset.source_field='document'.*'text'"):
        load_examples(cfg("xsum", path=str(tmp_path)))


def test_no_references(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"concept_set_idx": 0, "concepts": ["a"], "target": ""}])
    with pytest.raises(ConfigError, match="no references"):
        load_examples(cfg("common_gen", path=str(tmp_path)))


def test_no_sample_for_dataset():
    with pytest.raises(ConfigError, match="no bundled sample"):
        load_examples(cfg("xsum", path="sample"))


def test_offline_hub_not_cached_fails_fast():
    conf = cfg("cnn_dm", hub_id="hsd-exp-tests/not-a-dataset")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_examples(conf)
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "'cnn_dm'" in message and "hsd-exp-tests/not-a-dataset" in message
    assert "dataset.path (null)" in message and "dataset.path=DIR" in message and "offline" in message


def test_offline_error_names_the_split_asked_for_when_derived():
    """HealthCareMagic's test split is cut from the Hub's train split: the message names both."""
    conf = cfg("healthcaremagic", hub_id="hsd-exp-tests/not-a-dataset", split="test")
    with pytest.raises(ConfigError, match=r"split 'test' \(derived from the Hub's 'train' split\).*test\.jsonl"):
        load_examples(conf)


def test_offline_without_env_probe_fails_fast(monkeypatch):
    """No offline env vars and no network: the 3 s probe makes it cache-only, not minutes of retries."""
    import hsd_exp.data.hub as data

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable"):
        load_examples(cfg("xsum", hub_id="hsd-exp-tests/not-a-dataset"))
    assert time.perf_counter() - start < 30


def test_hub_path_with_a_stub_hub(monkeypatch, tmp_path):
    """The Hub branch on in-memory `datasets.Dataset`s: same examples as the local files give."""
    import datasets

    import hsd_exp.data.hub as data

    hub = {
        ("lavita/ChatDoctor-HealthCareMagic-100k", "train"): HCM_ROWS,
        ("allenai/common_gen", "validation"): [
            {"concept_set_idx": 0, "concepts": ["a", "b"], "target": "t1"},
            {"concept_set_idx": 1, "concepts": ["c"], "target": "t2"},
            {"concept_set_idx": 0, "concepts": ["a", "b"], "target": "t3"},
        ],
    }
    calls = []

    def load_dataset(hub_id, hub_config=None, split=None):
        calls.append((hub_id, hub_config, split))
        if (hub_id, split) not in hub:
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")
        return datasets.Dataset.from_list(hub[(hub_id, split)])

    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "HealthCareMagic-100k.json").write_text(json.dumps(HCM_ROWS))
    for split in ("train", "test"):
        from_hub = load_examples(cfg("healthcaremagic"), split=split)
        assert from_hub == load_examples(cfg("healthcaremagic", path=str(tmp_path)), split=split)
    assert calls[0] == ("lavita/ChatDoctor-HealthCareMagic-100k", None, "train")  # derived from train
    grouped = load_examples(cfg("common_gen", split="validation"))
    assert grouped == [Example("0", "a, b", ["t1", "t3"]), Example("1", "c", ["t2"])]
    with pytest.raises(ConfigError, match=r"split 'test' not found in Hub dataset 'abisee/cnn_dailymail'"):
        load_examples(cfg("cnn_dm"))


# -----------------------------------------------------------------------------
# the real data (dev/CI machines only)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@needs_shared
def test_shared_data():
    expected = {  # examples, references (= rows) in the test split
        "e2e": (630, 4693),
        "common_gen": (1497, 6042),
        "xsum": (1910, 1910),
        "cnn_dm": (250, 250),
    }
    folders = {"cnn_dm": "cnn_dailymail"}
    for name, (n_examples, n_refs) in expected.items():
        examples = load_examples(cfg(name, path=str(SHARED / folders.get(name, name))))
        assert len(examples) == n_examples, name
        assert sum(len(ex.references) for ex in examples) == n_refs, name
        assert len({ex.id for ex in examples}) == n_examples, name
    e2e_train = load_examples(cfg("e2e", path=str(SHARED / "e2e")), split="train", limit=10)
    assert len(e2e_train) == 10 and all(len(ex.references) >= 1 for ex in e2e_train)


@needs_shared
def test_make_samples_reproduces_bundle(tmp_path):
    script = ROOT / "hsd_exp" / "samples" / "make_samples.py"
    subprocess.run([sys.executable, str(script), "--src", str(SHARED), "--out", str(tmp_path)], check=True)
    for name in ("e2e", "common_gen"):
        for split in ("train", "test"):
            fresh = (tmp_path / name / f"{split}.jsonl").read_bytes()
            assert fresh == (sample_dir(name) / f"{split}.jsonl").read_bytes(), f"{name}/{split}"


def test_jsonl_value_with_a_line_separator(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 raw; str.splitlines() would cut the line there
    write_jsonl(tmp_path / "test.jsonl", [{"document": "one\u2028two", "summary": "s", "id": "a"}])
    assert load_examples(cfg("xsum", path=str(tmp_path)))[0].source == "one\u2028two"


def test_a_corrupt_jsonl_line_is_named_by_file_and_line(tmp_path):
    """Line 3 is broken: the error says line 3 of that file, not json's "line 1 column 39"."""
    rows = [{"meaning_representation": f"name[{i}]", "human_reference": f"r{i}"} for i in range(2)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"meaning_representation": "name[x]", "human_refer\n'
    (tmp_path / "test.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=r"test\.jsonl, line 3: not valid JSON") as err:
        load_examples(cfg("e2e", path=str(tmp_path)))
    assert "line 1 column" not in str(err.value)


def test_dataset_limit_zero_is_refused_and_an_empty_split_too(tmp_path):
    """limit=0 or an empty file would score nothing and still write a metrics.json marked complete."""
    write_jsonl(tmp_path / "test.jsonl", [{"document": "d", "summary": "s", "id": "1"}])
    with pytest.raises(ConfigError, match=r"dataset.limit=0 must be a positive integer"):
        load_examples(cfg("xsum", path=str(tmp_path), limit=0))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"split 'test' of dataset.path=.*empty holds no rows"):
        load_examples(cfg("xsum", path=str(tmp_path / "empty")))


def test_every_missing_column_is_named_at_once_and_group_by_null_suggested(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a note", "summary": "s"}])
    with pytest.raises(ConfigError) as err:
        load_examples(cfg("e2e", path=str(tmp_path)))
    message = str(err.value)
    assert "dataset.source_field='meaning_representation'" in message
    assert "dataset.target_field='human_reference'" in message
    assert "dataset.group_by=null" in message and "'text'" in message


def test_custom_dataset_names_what_only_the_user_knows(tmp_path):
    """dataset=custom: path, columns, instruction and separator are ???; one message names them all."""
    with pytest.raises(ConfigError) as err:
        load_examples(cfg("custom"))
    for key in ("dataset.path", "dataset.source_field", "dataset.target_field", "dataset.instruction",
                "dataset.separator"):
        assert key in str(err.value)
    write_jsonl(tmp_path / "test.jsonl", [{"note": "n1", "gist": "g1"}, {"note": "n2", "gist": "g2"}])
    conf = cfg("custom", path=str(tmp_path), source_field="note", target_field="gist", instruction="Sum up.",
               separator="\\n\\nGist:")
    assert [(e.source, e.references) for e in load_examples(conf)] == [("n1", ["g1"]), ("n2", ["g2"])]
