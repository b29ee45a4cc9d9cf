"""Original-release readers: XSum's .summary files, CNN/DM's .story files, seq2seq line files, on fixtures
written in those formats, loaded through ``load_examples`` as ``dataset.path=DIR`` does."""

import hashlib
import json
from pathlib import Path

import pytest

from hsd_exp.data.loaders import load_examples
from hsd_exp.data.releases import parse_story, parse_xsum_summary, text_lines
from hsd_exp.errors import ConfigError

from helpers import dataset_cfg as cfg

# -----------------------------------------------------------------------------
# XSum: bbc-summary-data/<id>.summary + XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json

SUMMARY_FILE = """[SN]URL[SN]
http://www.bbc.co.uk/news/uk-{id}

[SN]TITLE[SN]
Title {id}

[SN]FIRST-SENTENCE[SN]
Summary of article {id}.

[SN]RESTBODY[SN]
Share this with
Email
Facebook
First body line of {id}.

Second line \u2028with a line separator.
These are external links and will open in a new window
"""


def write_xsum(root: Path, splits: dict[str, list[str]], missing: tuple[str, ...] = ()) -> None:
    (root / "bbc-summary-data").mkdir(parents=True)
    (root / "XSum-Dataset").mkdir()
    (root / "XSum-Dataset" / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json").write_text(json.dumps(splits))
    for ids in splits.values():
        for i in ids:
            if i not in missing:
                (root / "bbc-summary-data" / f"{i}.summary").write_text(SUMMARY_FILE.format(id=i), encoding="utf-8")


def test_parse_xsum_summary_as_the_hub_script():
    fields = parse_xsum_summary(SUMMARY_FILE.format(id="7"))
    assert fields["FIRST-SENTENCE"] == "Summary of article 7."
    # widget lines and blank lines dropped, body lines joined by "\n", U+2028 kept inside its line
    assert fields["RESTBODY"] == "First body line of 7.\nSecond line \u2028with a line separator."
    assert fields["TITLE"] == "Title 7"


def test_xsum_release_dir_in_split_order(tmp_path, caplog):
    write_xsum(tmp_path, {"train": ["1", "2"], "validation": ["3"], "test": ["9", "4", "5"]}, missing=("5",))
    examples = load_examples(cfg("xsum", path=str(tmp_path), split="test"))
    assert [e.id for e in examples] == ["9", "4"]  # the json's order; 5 has no file: skipped with a warning
    assert examples[1].references == ["Summary of article 4."]
    assert examples[1].source.startswith("First body line of 4.\n")
    assert "1 of 3 ids have no .summary file" in caplog.text
    assert [e.id for e in load_examples(cfg("xsum", path=str(tmp_path), split="validation"))] == ["3"]


def test_xsum_release_duplicate_ids_and_bad_files(tmp_path):
    write_xsum(tmp_path, {"test": ["4", "9", "4"]})
    assert [e.id for e in load_examples(cfg("xsum", path=str(tmp_path)))] == ["4", "9"]
    (tmp_path / "bbc-summary-data" / "9.summary").write_bytes(b"[SN]URL[SN]\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"9.summary: not UTF-8"):
        load_examples(cfg("xsum", path=str(tmp_path)))
    (tmp_path / "XSum-Dataset" / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse .*SPLIT-90-5-5.json"):
        load_examples(cfg("xsum", path=str(tmp_path)))


def test_xsum_release_data_beside_the_split_folder(tmp_path):
    write_xsum(tmp_path / "XSum", {"test": ["1"]})  # dataset.path = the XSum-Dataset folder itself
    assert [e.id for e in load_examples(cfg("xsum", path=str(tmp_path / "XSum" / "XSum-Dataset")))] == ["1"]


def test_xsum_release_unknown_split(tmp_path):
    write_xsum(tmp_path, {"train": ["1"], "test": ["2"]})
    with pytest.raises(ConfigError, match=r"split 'validation' not in .*it has \['test', 'train'\]"):
        load_examples(cfg("xsum", path=str(tmp_path), split="validation"))


# -----------------------------------------------------------------------------
# CNN/DailyMail: {cnn,dailymail}/stories/<sha1(url)>.story + url_lists/all_{train,val,test}.txt

STORY = """(CNN) -- A caption without a full stop

The article's second paragraph ends properly.

@highlight

First highlight

@highlight

Second highlight ends with a quote\u201d
"""


def sha1(url: str) -> str:
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def write_cnn_dm(root: Path) -> dict[str, str]:
    urls = {name: f"http://www.{pub}.com/{name}" for name, pub in
            [("c1", "cnn"), ("c2", "cnn"), ("d1", "dailymail"), ("d2", "dailymail"), ("empty", "cnn")]}
    for name, url in urls.items():
        folder = root / ("cnn" if "cnn" in url else "dailymail") / "stories"
        folder.mkdir(parents=True, exist_ok=True)
        text = "@highlight\n\nonly a highlight\n" if name == "empty" else STORY.replace("A caption", f"{name}: a caption")
        (folder / f"{sha1(url)}.story").write_text(text, encoding="utf-8")
    (root / "url_lists").mkdir()
    (root / "url_lists" / "all_test.txt").write_text("\n".join(urls[n] for n in ("d2", "c2", "empty", "d1")) + "\n")
    (root / "url_lists" / "all_train.txt").write_text(urls["c1"] + "\n")
    return {name: sha1(url) for name, url in urls.items()}


def test_parse_story_as_the_hub_script():
    article, highlights = parse_story(STORY)
    assert article == "(CNN) -- A caption without a full stop . The article's second paragraph ends properly."
    assert highlights == "First highlight .\nSecond highlight ends with a quote\u201d"
    # a line mentioning @highlight gets no full stop (the Hub's check is "in", not "startswith"); a lone \r stays
    assert parse_story("see @highlight below\nA\rB\n") == ("see @highlight below A\rB .", "")


def test_cnn_dm_release_dir(tmp_path):
    ids = write_cnn_dm(tmp_path)
    examples = load_examples(cfg("cnn_dm", path=str(tmp_path), split="test"))
    # the url list's order; the story without an article is dropped
    assert [e.id for e in examples] == [ids["d2"], ids["c2"], ids["d1"]]
    assert examples[1].source.startswith("(CNN) -- c2: a caption without a full stop . ")
    assert examples[0].references == ["First highlight .\nSecond highlight ends with a quote\u201d"]
    assert [e.id for e in load_examples(cfg("cnn_dm", path=str(tmp_path), split="train"))] == [ids["c1"]]


def test_cnn_dm_release_missing_stories(tmp_path, caplog):
    ids = write_cnn_dm(tmp_path)
    for story in (tmp_path / "dailymail" / "stories").glob("*.story"):
        story.unlink()  # only cnn/ unpacked
    assert [e.id for e in load_examples(cfg("cnn_dm", path=str(tmp_path), split="test"))] == [ids["c2"]]
    assert "2 of 4 stories of all_test.txt not found" in caplog.text
    for story in (tmp_path / "cnn" / "stories").glob("*.story"):
        story.unlink()
    (tmp_path / "cnn" / "stories" / "x.story").write_text("unrelated\n\n@highlight\n\nh\n")
    with pytest.raises(ConfigError, match="none of the 4 stories of .*all_test.txt"):
        load_examples(cfg("cnn_dm", path=str(tmp_path), split="test"))


def test_cnn_dm_release_missing_url_list(tmp_path):
    write_cnn_dm(tmp_path)
    with pytest.raises(ConfigError, match=r"no url_lists/all_val.txt .*splits: \['test', 'train'\]"):
        load_examples(cfg("cnn_dm", path=str(tmp_path), split="validation"))


# -----------------------------------------------------------------------------
# {split}.source + {split}.target


def test_seq2seq_line_files(tmp_path):
    (tmp_path / "val.source").write_text("doc one\ndoc \u2028two\n", encoding="utf-8")
    (tmp_path / "val.target").write_text("sum one\nsum two\n", encoding="utf-8")
    examples = load_examples(cfg("xsum", path=str(tmp_path), split="validation"))
    assert [(e.source, e.references) for e in examples] == [("doc one", ["sum one"]), ("doc \u2028two", ["sum two"])]
    assert [e.id for e in examples] == ["0", "1"]


def test_seq2seq_line_counts_must_match(tmp_path):
    (tmp_path / "test.source").write_text("a\nb\n")
    (tmp_path / "test.target").write_text("a\n")
    with pytest.raises(ConfigError, match="has 2 lines but .* has 1"):
        load_examples(cfg("cnn_dm", path=str(tmp_path)))


def test_no_release_names_the_splits_found(tmp_path):
    (tmp_path / "train.source").write_text("a\n")
    (tmp_path / "train.target").write_text("b\n")
    with pytest.raises(ConfigError, match=r"split 'test' not found .*\['train'\]"):
        load_examples(cfg("xsum", path=str(tmp_path)))


def test_text_lines_cuts_at_newlines_only():
    assert text_lines("a\u2028b\r\nc\n") == ["a\u2028b", "c"]
    assert text_lines("") == []
