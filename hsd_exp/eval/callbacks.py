"""Lightning callbacks around ``trainer.test``: the skip policy on while decoding, per-token progress, the
predictions streamed from each ``test_step``'s outputs and the metrics written at the end.

What passes between them and the module is explicit: ``SkipPolicyCallback`` sets the module's declared
``skip_stats`` (its layer records come from them) and ``TokenProgressCallback`` its ``token_tick``; ``test_step``
returns a ``GeneratedBatch`` (texts, layer records, tokens, seconds) that ``PredictionsCallback`` writes; tasks.py
hands the predictions callback the skip callback, whose lossless record goes into metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from hsd_exp.console import StepTick
from hsd_exp.decoding import DecodeSettings
from hsd_exp.eval.layer_map import log_layer_map, write_layer_map
from hsd_exp.eval.metrics import summarize_run
from hsd_exp.eval.predictions import PredictionWriter, read_run_predictions, write_metrics
from hsd_exp.eval.speed import SPEED_KEYS, SpeedLog, flop_ideal, lossless_layer_forwards
from hsd_exp.run_folder import METRICS_FILE, predictions_file
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy


class WarmUpCallback(pl.Callback):
    """``pl_module.warm_up()`` when testing starts: after Lightning has moved the model to this rank's device (under
    DDP the model is loaded on the CPU), and under the same precision context as the steps, so the kernels it warms
    are the ones decoding uses. Put it first: the other callbacks start their clocks and the skip policy after it,
    so its tokens count in neither tokens/s nor Avg. Layer.
    """

    def on_test_start(self, trainer, pl_module):
        with trainer.precision_plugin.test_step_context():
            pl_module.warm_up()


class SkipPolicyCallback(pl.Callback):
    """Enters ``layer_skipping`` when testing starts and leaves it when it ends (or fails).

    ``decode`` says how: Tmax = decode.max_new_tokens, and with decode=lossless the policy drafts while the full
    model verifies. Training and validation are untouched; after ``on_test_end`` the model's ``generate()`` is plain
    again. With ``run_dir``, a per-token policy's layer map (which layers ran at which token) goes there and to the
    loggers (hsd_exp.eval.layer_map).
    """

    def __init__(self, policy: Policy, decode: DecodeSettings, run_dir: str | None = None):
        self.policy = policy
        self.decode = decode
        self.run_dir = Path(run_dir) if run_dir else None
        self._ctx = None
        self.stats = None  # SkipStats of the last test loop

    def decode_record(self) -> dict:
        """What metrics.json records of the decoding (decode=lossless: the drafts' acceptance and cost)."""
        return self.decode.record(self.stats)

    def _enter(self, pl_module) -> None:
        policy = self.policy
        if "router" in policy.objects and policy.router is None and pl_module.router is not None:
            policy = policy.with_router(pl_module.router)  # SkipLayer: the router the checkpoint restored
        self._ctx = layer_skipping(pl_module.model, policy, max_new_tokens=self.decode.max_new_tokens,
                                   lossless=self.decode.lossless)
        self.stats = self._ctx.__enter__()
        pl_module.skip_stats = self.stats

    def _exit(self, pl_module) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        pl_module.skip_stats = None

    def on_test_start(self, trainer, pl_module):
        self._enter(pl_module)

    def on_test_end(self, trainer, pl_module):
        self._exit(pl_module)
        rates = self.stats.run_rates() if self.stats is not None else []
        if rates and self.run_dir is not None and trainer.is_global_zero:
            per_layer = write_layer_map(self.run_dir, rates, f"{self.policy.display_name}: layers run per token")
            log_layer_map(trainer.loggers, self.run_dir, per_layer, trainer.global_step)

    def on_exception(self, trainer, pl_module, exception):
        self._exit(pl_module)


class TokenProgressCallback(pl.Callback):
    """Moves the test bar within a batch: a CALM batch on a CPU can take minutes, and a bar that moves per batch
    only sat at 0/1 for all of it.

    The module's ``generate()`` gets a ``StepTick`` (a logits processor that returns the scores untouched: the tokens
    are those of a run without it, beams and sampling included), and each tick advances the bar by 1/max_new_tokens
    of a batch and shows ``token t/max_new_tokens`` beside it (Rich: in the description; tqdm: as postfix), redrawn
    at most every ``min_interval`` seconds. Without a bar it adds nothing.
    """

    MIN_INTERVAL = 0.2  # seconds between redraws

    def __init__(self, max_new_tokens: int, min_interval: float | None = None):
        self.max_new_tokens = max(1, int(max_new_tokens))
        self.min_interval = self.MIN_INTERVAL if min_interval is None else min_interval
        self.bar = None
        self.batch_idx = 0
        self.step = 0
        self._shown = 0.0
        self._description: str | None = None

    def on_test_start(self, trainer, pl_module):
        bar = trainer.progress_bar_callback
        if bar is None or not bar.is_enabled:
            return
        self.bar = bar
        pl_module.token_tick = StepTick(self.tick)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batch_idx, self.step = batch_idx, 0

    def tick(self) -> None:
        self.step += 1
        now = time.monotonic()
        if now - self._shown < self.min_interval:
            return
        self._shown = now
        self._show(f"token {min(self.step, self.max_new_tokens)}/{self.max_new_tokens}",
                   self.batch_idx + min(self.step, self.max_new_tokens) / self.max_new_tokens)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.bar is not None:  # the bar itself moves to batch_idx + 1 next
            self._show(None, None)

    def _show(self, text: str | None, completed: float | None) -> None:
        bar = self.bar
        if isinstance(bar, pl.callbacks.RichProgressBar):
            task = getattr(bar, "test_progress_bar_id", None)
            if bar.progress is None or task is None:
                return
            if self._description is None:
                self._description = bar.progress.tasks[task].description
            fields = {"description": self._description if text is None else f"{self._description} · {text}"}
            if completed is not None:
                fields["completed"] = completed
            bar.progress.update(task, **fields)
            bar.refresh()
        elif isinstance(bar, pl.callbacks.TQDMProgressBar):
            tqdm_bar = getattr(bar, "_test_progress_bar", None)
            if tqdm_bar is not None:
                tqdm_bar.set_postfix_str(text or "", refresh=True)

    def _detach(self, pl_module) -> None:
        pl_module.token_tick = None
        self.bar = None
        self._description = None

    def on_test_end(self, trainer, pl_module):
        self._detach(pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self._detach(pl_module)


class PredictionsCallback(pl.Callback):
    """Streams every prediction to ``predictions.jsonl`` as its batch ends (``test_step``'s outputs); at the end
    scores all of them into ``metrics.json``.

    Resume: the writer reopens the same file and keeps what is there; the data module was built without
    those ids, so nothing is recomputed and nothing lost. Metrics cover every record in the file. ``skip``: the
    run's SkipPolicyCallback, whose decoding record (decode=lossless) joins the metrics.
    """

    def __init__(self, run_dir: str, bertscore: dict | None, meta: dict, skip: SkipPolicyCallback | None = None,
                 wandb_samples: int = 32):
        self.run_dir = Path(run_dir)
        self.bertscore = bertscore
        self.meta = meta  # policy, policy_label, dataset, model, num_layers, ... -> metrics.json
        self.skip = skip
        self.wandb_samples = wandb_samples
        self.writer: PredictionWriter | None = None
        self.metrics: dict | None = None
        self.speed = SpeedLog()  # this process's batches: tokens, seconds, decode steps and their time
        self._t0 = 0.0

    def on_test_start(self, trainer, pl_module):
        self.writer = PredictionWriter(self.run_dir / predictions_file(trainer.global_rank, trainer.world_size))
        self.speed = SpeedLog()
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for i, text in enumerate(outputs.texts):
            length = {"new_tokens": outputs.lengths[i]} if outputs.lengths else {}
            self.writer.write(batch["ids"][i], batch["sources"][i], batch["references"][i], text, outputs.layers[i],
                              **length)
        self.speed.add(outputs, prompt_len=int(batch["input_ids"].shape[1]))

    def on_test_end(self, trainer, pl_module):
        if self.writer is not None:
            self.writer.close()
        # DDP: every rank generated its share in parallel, so throughput = all tokens / the slowest rank's time.
        sums = pl_module.all_gather(torch.tensor(self.speed.as_list(), dtype=torch.float64))
        speed = SpeedLog.merged(sums.view(-1, len(SPEED_KEYS)).tolist())  # (world_size, keys)
        trainer.strategy.barrier()
        if trainer.global_rank != 0:
            return
        records = read_run_predictions(self.run_dir)  # every rank's file, each id once
        tokens = [n for r in records for n in r["layers_per_token"]]
        stats = self.skip.stats if self.skip is not None else None
        self.metrics = summarize_run(
            records, self.bertscore,
            avg_layers=sum(tokens) / len(tokens) if tokens else None,
            **speed.summary(),  # tokens_per_s, ms_per_step, prefill_ms, decode_steps
            # this process's steps (a resume: what it generated itself); rank 0's stats under DDP
            flop_ideal=flop_ideal(pl_module.model, stats, speed.context) if speed.decode_steps else None,
            layer_forwards_per_token=lossless_layer_forwards(stats),
            generated_tokens_this_run=speed.tokens,
            wall_seconds=time.perf_counter() - self._t0,
            complete=True,
            **self.meta,
            **(self.skip.decode_record() if self.skip is not None else {}),  # lossless: acceptance, cost
        )
        write_metrics(self.run_dir, self.metrics)
        self._log(trainer, records)

    def _log(self, trainer, records: list[dict]) -> None:
        numeric = {f"test/{k}": float(v) for k, v in self.metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        for logger in trainer.loggers:
            logger.log_metrics(numeric, step=trainer.global_step)
            if hasattr(logger, "log_table"):  # W&B: a table of sample predictions
                rows = [[r["id"], r["source"], " || ".join(r["references"]), r["prediction"]]
                        for r in records[: self.wandb_samples]]
                logger.log_table(key="predictions", columns=["id", "source", "references", "prediction"], data=rows)

    def finish_without_loop(self, trainer, pl_module) -> None:
        """Nothing was left to generate, so Lightning skipped the loop and these hooks: keep a finished run's
        metrics (the tokens/s of the run that generated), or score a run that stopped before writing them."""
        done = self.run_dir / METRICS_FILE
        if done.is_file():
            self.metrics = json.loads(done.read_text())
        else:
            self.on_test_start(trainer, pl_module)
            self.on_test_end(trainer, pl_module)
