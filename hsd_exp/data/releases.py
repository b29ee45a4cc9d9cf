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

The XSum and CNN/DM rows (fields, text, ids) follow the Hub loaders' scripts: XSum drops the share-widget
lines, takes FIRST-SENTENCE as the summary and RESTBODY (lines joined by newlines) as the document, each id
once; CNN/DM adds " ." to lines without an end mark, joins article lines with spaces and highlights with
newlines (version 3.0.0) and drops the stories without article or highlights. The *order* cannot follow the
Hub's (its scripts yield in the order of the downloaded archives): XSum rows come in the split json's order,
CNN/DM rows in the url list's (the order of abisee/cnn-dailymail's make_datafiles.py), so ``dataset.limit=N``
picks other examples than it does on the Hub id. Line files hold whatever text they were written with (the
seq2seq CNN/DM files join highlights with spaces, for instance) and number their rows from 0.
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
        return set(_read_json(split_file))
    if _cnn_dm_story_dirs(directory):
        return {s for s, name in CNN_DM_URL_LISTS.items() if _url_list(directory, name)}
    return {s for s in ("train", "validation", "test") if _seq2seq_files(directory, s)}


# -----------------------------------------------------------------------------
# XSum: bbc-summary-data/<id>.summary + the split json


def _xsum_split_file(directory: Path) -> Path | None:
    for candidate in (directory / XSUM_SPLIT_FILE, directory / "XSum-Dataset" / XSUM_SPLIT_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_xsum(directory: Path, split_file: Path, split: str) -> list[dict]:
    """Hub rows (document, summary, id) of one split, in the split file's order, each id once."""
    ids = _read_json(split_file)
    if split not in ids:
        raise ConfigError(f"split {split!r} not in {split_file} (it has {sorted(ids)}); set dataset.split=<one of them>")
    wanted = list(dict.fromkeys(str(i) for i in ids[split]))  # de-duplicated, order kept (the Hub yields each once)
    candidates = (directory / "bbc-summary-data", split_file.parent / "bbc-summary-data",
                  split_file.parent.parent / "bbc-summary-data")
    data = next((d for d in candidates if d.is_dir()), directory)
    rows, missing = [], 0
    for bbc_id in wanted:
        file = data / f"{bbc_id}.summary"
        if not file.is_file():
            missing += 1
            continue
        fields = parse_xsum_summary(_read_text(file))
        rows.append({"document": fields.get("RESTBODY", ""), "summary": fields.get("FIRST-SENTENCE", ""), "id": bbc_id})
    if not rows:
        raise ConfigError(f"XSum split {split!r}: none of its {len(wanted)} ids has a .summary file in {data}; "
                          f"point dataset.path at the folder holding bbc-summary-data/")
    if missing:
        log.warning("XSum %s: %d of %d ids have no .summary file in %s (skipped)", split, missing, len(wanted), data)
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
    """Hub rows (article, highlights, id) of one split: the stories whose sha1(url) is in its url list, in
    the list's order."""
    name = CNN_DM_URL_LISTS.get(split)
    urls = _url_list(directory, name) if name else None
    if urls is None:
        raise ConfigError(f"CNN/DailyMail split {split!r}: no url_lists/{name or 'all_<split>.txt'} in {directory} "
                          f"(splits: {sorted(release_splits(directory))}); add abisee/cnn-dailymail's url_lists/ "
                          f"or set dataset.split=<one of them>")
    stories = {f.stem: f for d in _cnn_dm_story_dirs(directory) for f in d.glob("*.story")}
    hashes = [hashlib.sha1(u.strip().encode("utf-8")).hexdigest() for u in text_lines(_read_text(urls)) if u.strip()]
    rows, missing = [], 0
    for h in dict.fromkeys(hashes):
        if h not in stories:
            missing += 1
            continue
        article, highlights = parse_story(_read_text(stories[h]))
        if article and highlights:  # 114 stories have no text; the Hub drops them too
            rows.append({"article": article, "highlights": highlights, "id": h})
    if not rows:
        raise ConfigError(f"CNN/DailyMail split {split!r}: none of the {len(hashes)} stories of {urls} is in "
                          f"{directory}/{{cnn,dailymail}}/stories; point dataset.path at the folder holding both")
    if missing:
        log.warning("CNN/DailyMail %s: %d of %d stories of %s not found (skipped; only one of cnn/ and "
                    "dailymail/ unpacked?)", split, missing, len(hashes), urls.name)
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
        if "@highlight" not in line and not line.endswith(CNN_DM_END_MARKS):
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
    sources, targets = (text_lines(_read_text(f)) for f in files)
    if len(sources) != len(targets):
        raise ConfigError(f"{files[0]} has {len(sources)} lines but {files[1]} has {len(targets)}: "
                          f"line i of each must be example i")
    rows = [{source_field: s, target_field: t} for s, t in zip(sources, targets, strict=True)]
    if id_field:
        for i, row in enumerate(rows):
            row[id_field] = str(i)
    return rows


def _read_text(file: Path) -> str:
    """UTF-8 text as stored: no newline translation (a lone "\r" inside a line stays), as the Hub's scripts."""
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {file}: not UTF-8 ({e}); the original releases are UTF-8") from e


def _read_json(file: Path):
    text = _read_text(file)
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"cannot parse {file}: {e}; expected the release's split json") from e


def text_lines(text: str) -> list[str]:
    """Lines split at "\n" only: str.splitlines() would also cut at U+2028, U+0085 etc. inside a text."""
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


__all__ = ["ORIGINAL_FILES", "SPLIT_ALIASES", "normalise", "read_release_dir", "release_splits",
           "parse_xsum_summary", "parse_story", "text_lines"]
