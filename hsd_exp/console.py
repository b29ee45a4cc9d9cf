"""What a run prints: its progress, its result and real warnings; library boilerplate only with ``hydra.verbose``.

``quiet_libraries`` (called by the entry points, unless ``hydra.verbose`` or ``-v`` is set) silences what every run
would repeat: Lightning's banner (GPU/TPU lines, its logger tip, the ``val_check_interval`` note during evaluation),
absl's "Using default tokenizer" (rouge-score), transformers' "Loading weights" bars (Hub download bars stay), W&B's
start/finish chatter, and three warnings that say nothing about the run (listed in ``BOILERPLATE_WARNINGS``).

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
