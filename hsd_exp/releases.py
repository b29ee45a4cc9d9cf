"""Datasets' original release files -> rows in the Hub schema of their ``conf/dataset/*.yaml``.

One table per release, so that ``dataset.path=DIR`` pointing at an unpacked download gives the same rows
(same fields, same text) as the Hub id:

=============  =====================================================  ===================================
dataset        files in DIR                                           Hub schema
=============  =====================================================  ===================================
E2E            ``trainset.csv`` / ``devset.csv`` / ``testset_w_refs   ``meaning_representation``,
               .csv`` (columns ``mr``, ``ref``; tuetschek/e2e-dataset) ``human_reference``
CommonGen      ``commongen.{train,dev,test}.jsonl`` (``concept_set``  ``concept_set_idx``, ``concepts``,
               "a#b#c", ``scene`` list)                               ``target``
HealthCareMag. ``HealthCareMagic-100k.json`` (a JSON list)            as is
XSum           ``XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json`` and       ``document``, ``summary``, ``id``
               ``bbc-summary-data/<id>.summary`` (EdinburghNLP/XSum)
CNN/DailyMail  ``{cnn,dailymail}/stories/<sha1(url)>.story`` and      ``article``, ``highlights``, ``id``
               ``url_lists/all_{train,val,test}.txt`` (DMQA +
               abisee/cnn-dailymail)
any            ``{split}.source`` + ``{split}.target``, one example    ``source_field``, ``target_field``
               per line (XSum / CNN-DM as fairseq and HF's seq2seq
               examples ship them)
=============  =====================================================  ===================================

The XSum and CNN/DM rules are those of the Hub loaders' scripts: XSum drops the share-widget lines, takes
FIRST-SENTENCE as the summary and RESTBODY (lines joined by newlines) as the document; CNN/DM adds " ." to
lines without an end mark, joins article lines with spaces and highlights with newlines (version 3.0.0),
lists CNN before Daily Mail, each sorted by file name, and drops stories without article or highlights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from hsd_exp.errors import ConfigError

log = logging.getLogger(__name__)

# single-file releases: file names per split
ORIGINAL_FILES = {
    "train": ["trainset.csv", "commongen.train.jsonl", "HealthCareMagic-100k.json"],
    "validation": ["devset.csv", "commongen.dev.jsonl"],
    "test": ["testset_w_refs.csv", "commongen.test.jsonl"],
}
# file stems a split may have besides its own name
SPLIT_ALIASES = {"validation": ["dev", "val", "valid"], "test": [], "train": []}

XSUM_SPLIT_FILE = "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
# lines of the BBC pages' share widget, dropped as the Hub's xsum script does
XSUM_WIDGET_LINES = {
    "Share this with", "Email", "Facebook", "Messenger", "Twitter", "Pinterest", "WhatsApp", "Linkedin",
    "LinkedIn", "Copy this link", "These are external links and will open in a new window",
}
CNN_DM_URL_LISTS = {"train": "all_train.txt", "validation": "all_val.txt", "test": "all_test.txt"}
# acceptable ends of a sentence in CNN/DM stories (abisee/cnn-dailymail's END_TOKENS)
CNN_DM_END_MARKS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


def normalise(rows: list[dict]) -> list[dict]:
    """Rows of a single-file release -> Hub schema (detected by the columns present)."""
    if not rows:
        return rows
    first = rows[0]
    if {"mr", "ref"} <= first.keys():  # E2E release csv -> tuetschek/e2e_nlg
        return [{"meaning_representation": r["mr"], "human_reference": r["ref"]} for r in rows]
    if "concept_set" in first:  # CommonGen release jsonl -> allenai/common_gen
        out = []
        for idx, r in enumerate(rows):
            concepts = r["concept_set"].split("#")
            for scene in r.get("scene") or [""]:  # the hidden test set has no scenes
                out.append({"concept_set_idx": idx, "concepts": concepts, "target": scene})
        return out
    return rows


def read_release_dir(directory: Path, split: str, fields: dict) -> list[dict] | None:
    """Rows of ``split`` from a multi-file release in ``directory``; None when it holds none.

    ``fields``: the dataset config's ``source_field`` / ``target_field`` / ``id_field``, the names the
    line-file format gives its columns (its id is the line number).
    """
    if (split_file := _xsum_split_file(directory)) is not None:
        return read_xsum(directory, split_file, split)
    if _cnn_dm_story_dirs(directory):
        return read_cnn_dm(directory, split)
    return read_seq2seq(directory, split, fields.get("source_field") or "source",
                        fields.get("target_field") or "target", fields.get("id_field"))


def release_splits(directory: Path) -> set[str]:
    """Splits a multi-file release in ``directory`` offers (for error messages)."""
    if (split_file := _xsum_split_file(directory)) is not None:
        return set(json.loads(split_file.read_text(encoding="utf-8")))
    if _cnn_dm_story_dirs(directory):
        return {s for s, name in CNN_DM_URL_LISTS.items() if _url_list(directory, name)}
    return {s for s in CNN_DM_URL_LISTS if _seq2seq_files(directory, s)}


# -----------------------------------------------------------------------------
# XSum: bbc-summary-data/<id>.summary + the split json


def _xsum_split_file(directory: Path) -> Path | None:
    for candidate in (directory / XSUM_SPLIT_FILE, directory / "XSum-Dataset" / XSUM_SPLIT_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_xsum(directory: Path, split_file: Path, split: str) -> list[dict]:
    """Hub rows (document, summary, id) of one split, in the split file's order."""
    ids = json.loads(split_file.read_text(encoding="utf-8"))
    if split not in ids:
        raise ConfigError(f"split {split!r} not in {split_file} (it has {sorted(ids)}); set dataset.split=<one of them>")
    data = directory / "bbc-summary-data" if (directory / "bbc-summary-data").is_dir() else directory
    rows, missing = [], 0
    for bbc_id in ids[split]:
        file = data / f"{bbc_id}.summary"
        if not file.is_file():
            missing += 1
            continue
        fields = parse_xsum_summary(file.read_text(encoding="utf-8"))
        rows.append({"document": fields.get("RESTBODY", ""), "summary": fields.get("FIRST-SENTENCE", ""),
                     "id": str(bbc_id)})
    if not rows:
        raise ConfigError(f"XSum split {split!r}: none of its {len(ids[split])} ids has a .summary file in {data}; "
                          f"point dataset.path at the folder holding bbc-summary-data/")
    if missing:
        log.warning("XSum %s: %d of %d ids have no .summary file in %s (skipped)", split, missing, len(ids[split]), data)
    return rows


def parse_xsum_summary(text: str) -> dict[str, str]:
    """``[SN]NAME[SN]`` sections of one .summary file -> {NAME: text}, widget and blank lines dropped."""
    kept = "\n".join(line for line in text_lines(text) if line.strip() and line not in XSUM_WIDGET_LINES)
    parts = kept.split("[SN]")  # "", "URL", url, "TITLE", title, "FIRST-SENTENCE", first, "RESTBODY", body
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=False)}


# -----------------------------------------------------------------------------
# CNN/DailyMail: {cnn,dailymail}/stories/*.story + url_lists/all_{split}.txt


def _cnn_dm_story_dirs(directory: Path) -> list[Path]:
    return [d for d in (directory / "cnn" / "stories", directory / "dailymail" / "stories") if d.is_dir()]


def _url_list(directory: Path, name: str) -> Path | None:
    for candidate in (directory / "url_lists" / name, directory / name):
        if candidate.is_file():
            return candidate
    return None


def read_cnn_dm(directory: Path, split: str) -> list[dict]:
    """Hub rows (article, highlights, id) of one split: the stories whose sha1(url) is in its url list."""
    name = CNN_DM_URL_LISTS.get(split)
    urls = _url_list(directory, name) if name else None
    if urls is None:
        raise ConfigError(f"CNN/DailyMail split {split!r}: no url_lists/{name or 'all_<split>.txt'} in {directory} "
                          f"(splits: {sorted(release_splits(directory))}); add abisee/cnn-dailymail's url_lists/ "
                          f"or set dataset.split=<one of them>")
    wanted = {hashlib.sha1(u.strip().encode("utf-8")).hexdigest()
              for u in text_lines(urls.read_text(encoding="utf-8")) if u.strip()}
    rows = []
    for stories in _cnn_dm_story_dirs(directory):  # CNN first, then Daily Mail, as the Hub
        for file in sorted(stories.glob("*.story")):
            if file.stem not in wanted:
                continue
            article, highlights = parse_story(file.read_text(encoding="utf-8"))
            if article and highlights:  # 114 stories have no text
                rows.append({"article": article, "highlights": highlights, "id": file.stem})
    return rows


def parse_story(text: str) -> tuple[str, str]:
    """(article, highlights) of one .story file, by the Hub's cnn_dailymail 3.0.0 rules."""
    article, highlights, next_is_highlight = [], [], False
    for line in (raw.strip() for raw in text_lines(text)):
        if not line:
            continue
        if line.startswith("@highlight"):
            next_is_highlight = True
            continue
        if not line.endswith(CNN_DM_END_MARKS):
            line += " ."  # image captions lack a full stop and would run into the next sentence
        (highlights if next_is_highlight else article).append(line)
    return " ".join(article), "\n".join(highlights)


# -----------------------------------------------------------------------------
# {split}.source + {split}.target line files


def _seq2seq_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    for stem in [split, *SPLIT_ALIASES.get(split, [])]:
        source, target = directory / f"{stem}.source", directory / f"{stem}.target"
        if source.is_file() and target.is_file():
            return source, target
    return None


def read_seq2seq(directory: Path, split: str, source_field: str, target_field: str,
                 id_field: str | None = None) -> list[dict] | None:
    """Rows {source_field: line, target_field: line[, id_field: line number]} of ``{split}.source`` /
    ``{split}.target``; None when the pair is absent."""
    files = _seq2seq_files(directory, split)
    if files is None:
        return None
    sources, targets = (text_lines(f.read_text(encoding="utf-8")) for f in files)
    if len(sources) != len(targets):
        raise ConfigError(f"{files[0]} has {len(sources)} lines but {files[1]} has {len(targets)}: "
                          f"line i of each must be example i")
    rows = [{source_field: s, target_field: t} for s, t in zip(sources, targets, strict=True)]
    if id_field:
        for i, row in enumerate(rows):
            row[id_field] = str(i)
    return rows


def text_lines(text: str) -> list[str]:
    """Lines split at "\n" only: str.splitlines() would also cut at U+2028, U+0085 etc. inside a text."""
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


__all__ = ["ORIGINAL_FILES", "SPLIT_ALIASES", "normalise", "read_release_dir", "release_splits",
           "parse_xsum_summary", "parse_story", "text_lines"]
