"""LightningModule around a Hugging Face causal LM: fine-tuning (full / LoRA) and generation for evaluation."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import cached_property
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from transformers import GenerationConfig, LogitsProcessorList

from hsd_exp.console import StepTick
from hsd_exp.eval.step_timer import StepTimer
from hsd_exp.models.layout import decoder_layers, readout
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy
from hsd_exp.skip.router import density_loss, run_rate
from hsd_exp.skip.skiplayer import SkipLayer
from hsd_exp.skip.stats import SkipStats
from hsd_exp.train.lora import apply_lora
from hsd_exp.train.recipes import Recipe, distill_kl, early_exit_loss, exit_weights, layer_outputs

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # a training batch's keys the model takes


class GeneratedBatch(NamedTuple):
    """What ``test_step`` returns for one batch (``PredictionsCallback`` streams it)."""

    texts: list[str]  # one prediction per example
    layers: list[list[float]]  # per example, the decoder layers run for each generated token after the first
    tokens: int  # tokens generated, up to and including each row's EOS
    seconds: float  # generate()'s wall time
    lengths: list[int] = []  # per example, its generated tokens (up to and including its EOS)
    prefill_seconds: float | None = None  # StepTimer: the prompt pass; None where no timer rode along (lossless)
    decode_steps: int = 0  # StepTimer: the batch's decode forwards (N - 1 for N generated positions)
    decode_seconds: float = 0.0  # StepTimer: their time, t_N - t_1


class CausalLMModule(pl.LightningModule):
    """Training: next-token loss on target tokens (labels = -100 elsewhere) with the configured optimizer.

    Evaluation (``trainer.test``): ``generate()`` with ``generation_config``; ``test_step`` returns the batch's
    ``GeneratedBatch``. Two fields are set by the evaluation callbacks for one test loop (None outside it):
    ``skip_stats`` (SkipPolicyCallback: the engine's counts, which give each row's layers per token) and
    ``token_tick`` (TokenProgressCallback: a logits processor ticking the bar per token, scores untouched).
    """

    def __init__(self, model, tokenizer, generation_config: GenerationConfig | None = None,
                 finetune: dict | None = None, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 skip_policy: Policy | None = None, router=None, router_cfg: dict | None = None):
        """``finetune``: the resolved ``finetune`` config; ``optimizer``: its ``optimizer`` node instantiated (a
        partial taking the parameters); ``skip_policy``: train skip-aware, with this policy's layer schedule;
        ``router``: SkipLayer's SkipRouter (trained when ``finetune.router``, else evaluated), ``router_cfg`` its
        training settings (density, loss weights)."""
        super().__init__()
        self.ft = dict(finetune or {"mode": "none"})
        self.tokenizer = tokenizer
        if self.ft["mode"] == "lora":
            model = apply_lora(model, self.ft["lora"])
        self.model = model
        self.router = router  # a submodule: its weights go into the checkpoint with the model's
        self.router_cfg = dict(router_cfg or {})
        self.generation_config = generation_config
        self.make_optimizer = optimizer
        self.skip_policy = skip_policy  # skip-aware training only; decoding uses the callback's policy
        self.skip_stats: SkipStats | None = None  # SkipPolicyCallback, while testing
        self.token_tick: StepTick | None = None  # TokenProgressCallback, while testing with a bar
        self.train_steps_skipped = 0
        self._warm = False

    # ------------------------------------------------------------------ training
    @cached_property
    def recipe(self) -> Recipe:
        """What each training step runs (``finetune``'s recipe keys); built on the first step, so an evaluation
        never checks training keys (preflight checks them before training)."""
        return Recipe.from_config(self.ft, self.skip_policy, self.num_layers)

    def _loss(self, batch) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS}).loss

    def _distilled(self, loss, logits, inputs: dict, weight: float) -> torch.Tensor:
        """loss + weight * KL(full-depth logits || ``logits``) on the target tokens; the teacher is the same model,
        same step, every layer (one more forward, no grad)."""
        with torch.no_grad():
            full = self.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits  # (B, Q, V)
        kl = distill_kl(logits, full, inputs["labels"])
        self.log("train/distill_kl", kl, on_step=True, on_epoch=True, batch_size=len(inputs["input_ids"]))
        return loss + weight * kl

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.ft["mode"] == "none" and self.router is not None:
            self.model.requires_grad_(False)  # the router trains alone on the frozen backbone
        if stage == "fit" and self.ft["mode"] == "full":
            # Full fine-tuning updates the weights themselves: keep them float32 (bf16-mixed autocasts the
            # forward). A bf16 copy would round most AdamW updates away. Before configure_optimizers, so the
            # optimizer and its state see float32 parameters.
            half = [p for p in self.model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
            if half:
                log.warning("finetune=full: casting %d %s parameters to float32 for training", len(half),
                            half[0].dtype)
                self.model.float()

    def on_train_epoch_start(self) -> None:
        # Models load in eval mode; Lightning >= 2.2 keeps submodule modes, so switch dropout on here.
        self.model.train()

    def training_step(self, batch, batch_idx):
        """One step of the recipe (hsd_exp.train.recipes): its depth drawn, then CE [+ distillation] [+ exits]."""
        if self.router is not None and self.ft.get("router"):
            return self._router_step(batch)
        recipe, n = self.recipe, len(batch["input_ids"])
        kind, policy = recipe.draw(random)  # Python's RNG: seed_everything seeds it
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        with ExitStack() as stack:
            if policy is not None:
                # Exactly the decode-time computation: prompt positions run every layer, the target position
                # with generated-token index T runs the schedule's set for T (or the row's dropout draw).
                stack.enter_context(layer_skipping(self.model, policy, max_new_tokens=self.ft["skip_max_new_tokens"],
                                                   prompt_len=int(batch["prompt_len"])))
            outputs = stack.enter_context(layer_outputs(decoder_layers(self.model))) if recipe.exit_scale else None
            out = self.model(**inputs)
        loss = out.loss
        if recipe.exit_scale:
            weights = exit_weights(self.num_layers, self.global_step, recipe.exit_scale, recipe.curriculum,
                                   recipe.rotation)
            loss, per_layer = early_exit_loss(outputs, out.loss, batch["labels"], readout(self.model), weights)
            self.log_dict({f"train/exit_ce_l{idx + 1}": ce for idx, ce in per_layer.items()}, on_step=True,
                          batch_size=n)
        if kind == "skipped" and recipe.distill_weight:
            loss = self._distilled(loss, out.logits, inputs, recipe.distill_weight)
        if kind == "skipped":
            self.train_steps_skipped += 1
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if not recipe.plain:  # the kinds of step apart: does the model learn to work with fewer layers?
            self.log(f"train/loss_{kind}", out.loss, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def _router_step(self, batch) -> torch.Tensor:
        """SkipLayer: every target position is routed as decoding routes it (prompt positions run every layer);
        loss = CE + loss_weight * sum_l (r_l - P)^2 [+ distill_weight * KL(full-depth || routed)]."""
        cfg, n = self.router_cfg, len(batch["input_ids"])
        self.router.train()
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        with layer_skipping(self.model, SkipLayer(router=self.router), max_new_tokens=self.ft["skip_max_new_tokens"],
                            prompt_len=int(batch["prompt_len"])):
            out = self.model(**inputs)
        step = self.router.last_step  # the forward's decisions: gates per layer, which positions were routed
        target = step.generated.unsqueeze(0) & batch["attention_mask"].bool()  # (B, Q) generated, not padding
        rates = [run_rate(z, target) for z in step.gates.values()]
        density = density_loss(rates, cfg["density"]).to(out.loss.device)
        loss = out.loss + cfg["loss_weight"] * density
        if cfg.get("distill_weight"):
            loss = self._distilled(loss, out.logits, inputs, cfg["distill_weight"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/ce", out.loss, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/density_loss", density, on_step=True, on_epoch=True, batch_size=n)
        if rates:
            self.log("train/run_rate", torch.stack(rates).mean(), prog_bar=True, on_step=True, batch_size=n)
            self.log_dict({f"router/run_rate_l{idx + 1}": r for idx, r in zip(step.gates, rates, strict=True)},
                          on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        return loss

    def configure_optimizers(self):
        backbone = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": backbone}] if backbone else []
        if self.router is not None and self.ft.get("router"):  # the gates learn at their own rate
            groups.append({"params": list(self.router.parameters()), "lr": self.router_cfg["lr"]})
        opt = self.make_optimizer(groups)
        warmup = self.ft["warmup_steps"]
        if not warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: LoRA keeps the adapter only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.router is not None:  # its shape, so evaluation rebuilds it before loading the weights
            checkpoint["hsd_router"] = self.router.config
        if self.ft["mode"] in ("lora", "none"):  # the trained weights only: the adapter and/or the router
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if "lora_" in k or k.startswith("router.")}
            checkpoint["hsd_adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.router is None:  # a router checkpoint evaluated without its router (policy=full): the model only
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("router.")}
        if checkpoint.get("hsd_adapter_only"):  # the frozen base weights it leaves out: this model's own
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_batch(self, batch) -> GeneratedBatch:
        """Predictions for one batch and, per example, the decoder layers run for each generated token."""
        gen, stats = self.generation_config, self.skip_stats
        lossless = stats is not None and stats.lossless is not None
        # The step timer and the progress tick ride on generate()'s logits processors, called once per step.
        # Lossless decoding runs its own rounds (a round is not one step): it gets neither, and its speed is
        # its wall time per token (its output is Full's, so the lengths match).
        timer = None if lossless else StepTimer()
        processors = [p for p in (timer, None if lossless else self.token_tick) if p is not None]
        extra = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
        start = time.perf_counter()
        if timer is not None:
            timer.start()
        out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  generation_config=gen, **extra)
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
        # Lossless: every committed token is the full model's, decided by a verify forward at full depth L, so
        # each records L, the depth that decided it; the engine's per-step records are the drafts' (a router's
        # per-row ones too) and must not stand for them. What drafts plus verifications ran per committed token
        # is metrics.json's layer_forwards_per_token (hsd_exp.eval.speed.lossless_layer_forwards).
        plain = stats is not None and not lossless
        per_step = list(stats.last_call) if plain else []
        per_row = stats.last_call_rows if plain else []
        beams = gen.num_beams or 1
        texts, layers, lengths = [], [], []
        for b, row in enumerate(new.tolist()):
            if per_row:  # a per-token policy (router): this example's own rows (its beams' mean), step by step
                per_step = [sum(step[b * beams:(b + 1) * beams]) / beams for step in per_row]
            n = _generated_length(row, gen.eos_token_id, gen.pad_token_id)
            lengths.append(n)
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
            # Token k (k >= 1) of this row came out of decode step k-1, the forward that fed token k-1 back;
            # token 0 came out of the prefill, which Avg. Layer leaves out. So the row's steps are 0..n-2,
            # whatever the other rows of the batch did: a row that ends early must not count the step that
            # fed its last token back only because a longer row kept the batch going.
            layers.append(per_step[:max(n - 1, 0)] if per_step else [self.num_layers] * max(n - 1, 0))
        timed = {} if timer is None else {"prefill_seconds": timer.prefill_seconds,
                                          "decode_steps": timer.decode_steps, "decode_seconds": timer.decode_seconds}
        return GeneratedBatch(texts, layers, sum(lengths), seconds, lengths, **timed)

    @torch.no_grad()
    def warm_up(self) -> None:
        """A 2-token generate() once per process before anything is timed."""
        if self._warm:
            return
        enc = self.tokenizer(["warm up"], return_tensors="pt").to(self.model.device)
        self.model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        self._warm = True

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def test_step(self, batch, batch_idx) -> GeneratedBatch:
        return self.generate_batch(batch)


def _generated_length(row: list[int], eos: int | list[int] | None, pad: int | None) -> int:
    """Tokens up to and including the first EOS; trailing pads (finished rows) do not count."""
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return i + 1
    n = len(row)
    while n and pad is not None and row[n - 1] == pad and pad not in eos_ids:
        n -= 1
    return n
