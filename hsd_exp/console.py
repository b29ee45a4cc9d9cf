"""What a run prints: its progress, its result and real warnings; library boilerplate only with ``hydra.verbose``.

``quiet_libraries`` (called by the entry points, unless ``hydra.verbose`` or ``-v`` is set) silences what every run
would repeat: Lightning's banner (GPU/TPU lines, its logger tip, the ``val_check_interval`` note during evaluation),
absl's "Using default tokenizer" (rouge-score), transformers' "Loading weights" bars (Hub download bars stay), W&B's
start/finish chatter, and the warnings that say nothing about the run (listed in ``BOILERPLATE_WARNINGS``). Whether
Lightning's INFO lines show (``lightning_info_shown``) also decides whether fine-tuning prints its model summary.

``result_line`` is an evaluation's one result line; ``report_hint`` (and ``ReportHint`` after a multirun) says where
the run folder is and which command reports on it.

``StepTick`` is the progress hook inside ``generate()``: a logits processor that counts tokens and returns the
scores untouched, so it works with greedy, sampling and beam search alike and cannot change what is generated.
``progress_bar`` draws such ticks outside Lightning (``task=generate``; the benchmark counts its calls).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from hydra.experimental.callback import Callback as HydraCallback
from transformers import LogitsProcessor

# Their INFO lines are the same every run; their warnings still show.
LIBRARY_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric", "absl")
BOILERPLATE_WARNINGS = (
    # torch's deprecation of LeafSpec, raised inside pytorch_lightning's own code: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # CSVLogger when a run resumes into its folder: the evaluation's metrics are logged again, over every prediction
    r"Experiment logs directory .* exists and is not empty",
    # a resumed run with every prediction already written: nothing left to generate is the point of resuming
    r"Total length of `DataLoader` across ranks is zero",
    # transformers 5 deprecates the alias that peft's get_peft_model / PeftModel.from_pretrained still read: every
    # LoRA fine-tuning and every model.adapter merge warned about code that is not ours
    r"`is_gradient_checkpointing` is deprecated",
)


def quiet_libraries(verbose=False) -> None:
    """Silence the libraries' per-run boilerplate (module docstring); nothing when ``verbose`` (``hydra.verbose``:
    true, a logger name or a list of them; any of them brings the boilerplate back)."""
    if verbose:
        return
    import pytorch_lightning  # noqa: F401  (its import sets its logger to INFO: import first, then lower it)
    from transformers.utils import logging as hf_logging

    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in BOILERPLATE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    hf_logging.set_tqdm_hook(_no_loading_bars)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's run banner and summary; trainer.finish_wandb says where


def _no_loading_bars(factory, args, kwargs):
    """transformers' bars over weights read from or written to local disk (two per evaluation with BERTScore,
    one per fine-tuning's export); Hub download bars keep theirs."""
    if kwargs.get("desc") in ("Loading weights", "Writing model shards"):
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


class StepTick(LogitsProcessor):
    """Calls ``tick()`` once per generated token (one call covers every row and beam) and returns ``scores`` as they
    came: generate() adds it after its own processors, and an identity changes no token, sampled or searched."""

    def __init__(self, tick: Callable[[], None]):
        self.tick = tick

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.tick()
        return scores


@contextmanager
def progress_bar(total: int, description: str, unit: str = "tokens", enabled: bool = True,
                 min_interval: float = 0.1) -> Iterator[Callable[..., None]]:
    """A transient bar on stderr; yields ``advance(description=None)``, one call per unit done.

    Drawn only on a terminal and only when advanced (at most every ``min_interval`` seconds, no refresh thread, so a
    timed call beside it pays next to nothing); it leaves nothing behind when it ends. Elsewhere advancing is free.
    ``task=generate`` ticks it per token (through ``StepTick``), the benchmark per timed call.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=False)
    task = progress.add_task(description, total=total)
    state = {"n": 0, "shown": 0.0}

    def advance(description: str | None = None) -> None:
        state["n"] += 1
        now = time.monotonic()
        if now - state["shown"] >= min_interval or state["n"] >= total:
            state["shown"] = now
            fields = {} if description is None else {"description": description}
            progress.update(task, completed=min(state["n"], total), refresh=True, **fields)

    with progress:
        yield advance


def lightning_info_shown() -> bool:
    """Whether Lightning's INFO lines show (``-v``, or no ``quiet_libraries``): its model summary goes with them."""
    return logging.getLogger("pytorch_lightning").isEnabledFor(logging.INFO)


# ---------------------------------------------------------------------------------------------- results
REPORTED_TASKS = ("evaluate", "compare", "finetune_evaluate")  # the tasks that leave run folders to report on


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def result_line(label: str, metrics: dict, lossless=None, plain: dict | None = None) -> str:
    """An evaluation's result on one line. ``lossless`` (``LosslessSettings``, decode=lossless) names the mode and
    the drafts' acceptance instead of an Avg. Layer; ``plain``, the metrics of the plain Full run of the same
    compare, adds the speedup tokens/s / tokens/s(plain Full): a lossless run writes full decoding's tokens, so
    both runs' outputs have the same lengths and the ratio is the wall-clock time per token's."""
    m, tok = metrics, metrics.get("tokens_per_s")
    speed = f"{tok:.1f} tok/s" if _number(tok) else "- tok/s"
    quality = f"R-L {m.get('rougeL') or 0:.2f} | BLEU-1 {m.get('bleu1') or 0:.2f}"
    if lossless is None:
        return f"{label}: Avg. Layer {m.get('avg_layers') or 0:.2f} | {quality} | {speed}"
    conf = f", c={lossless.draft_confidence:g}" if _number(lossless.draft_confidence) else ""
    accepted = f"acceptance {m['acceptance']:.2f}" if _number(m.get("acceptance")) else "acceptance -"
    ref = (plain or {}).get("tokens_per_s")
    gain = f" | {tok / ref:.2f}x plain full decoding's tok/s" if _number(tok) and _number(ref) and ref > 0 else ""
    return f"{label} -> lossless (k={lossless.draft_len}{conf}): {accepted} | {quality} | {speed}{gain}"


def report_hint(folder, what: str = "run folder") -> str:
    """Where a run went and the command that reports on it, on one line (printed after an evaluation)."""
    import shlex

    return f"{what}: {folder}  report: python -m hsd_exp.report {shlex.quote(str(folder))}"


def empty_answer(new_ids: list[int], tokenizer, fmt: dict) -> str:
    """Why task=generate printed an empty line, in one line (``fmt``: ``data.prompts.prompt_format``)."""
    if not new_ids:
        return "empty answer: no token was generated (decode.max_new_tokens)"
    eos = tokenizer.eos_token_id
    if new_ids[0] in (eos if isinstance(eos, list) else [eos]):
        form = ("the prompt as its chat turn" if fmt["chat"] else
                f"prompt + dataset.separator={fmt['separator']!r}")
        return (f"empty answer: the model wrote its end-of-sequence token first (prompt format: {form}); give a "
                "prompt in the form it was trained on (e.g. an E2E meaning representation for the E2E adapters), "
                "or dataset=... for another dataset's separator")
    return f"empty answer: the model wrote only special tokens or whitespace (token ids {new_ids[:8]})"


class ReportHint(HydraCallback):
    """After a multirun of an evaluating task: the sweep folder and the report command over all of its jobs
    (Hydra's callback seam, registered as ``hydra.callbacks.report_hint`` in conf/hydra/default.yaml)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("task") in REPORTED_TASKS:
            print(report_hint(config.hydra.sweep.dir, "sweep folder"), flush=True)
