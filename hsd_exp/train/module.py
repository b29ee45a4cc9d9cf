"""LightningModule around a Hugging Face causal LM: fine-tuning (full / LoRA) and generation for evaluation."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from transformers import GenerationConfig

from hsd_exp.families import decoder_layers
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy
from hsd_exp.train.lora import apply_lora

log = logging.getLogger(__name__)


class CausalLMModule(pl.LightningModule):
    """Training: next-token loss on target tokens (labels = -100 elsewhere) with the configured optimizer.

    Evaluation (``trainer.test``): ``generate()`` with ``generation_config``; ``SkipPolicyCallback`` applies the
    skip policy around the whole loop and sets ``self.skip_stats``, which gives each batch's layers per token.
    """

    def __init__(self, model, tokenizer, generation_config: GenerationConfig | None = None,
                 finetune: dict | None = None, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 skip_policy: Policy | None = None):
        """``finetune``: the resolved ``finetune`` config; ``optimizer``: its ``optimizer`` node instantiated (a
        partial taking the parameters); ``skip_policy``: train skip-aware, with this policy's layer schedule."""
        super().__init__()
        self.ft = dict(finetune or {"mode": "none"})
        self.tokenizer = tokenizer
        if self.ft["mode"] == "lora":
            model = apply_lora(model, self.ft["lora"])
        self.model = model
        self.generation_config = generation_config
        self.make_optimizer = optimizer
        self.skip_policy = skip_policy  # skip-aware training only; decoding uses the callback's policy
        self.skip_stats = None  # set by SkipPolicyCallback while testing
        self.on_generated = None  # callback(batch, predictions, layers_per_token) set by the writer callback
        self.generate_seconds = 0.0
        self.generated_tokens = 0
        self.train_steps_skipped = 0

    # ------------------------------------------------------------------ training
    def _loss(self, batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        return self.model(**inputs).loss

    def setup(self, stage: str) -> None:
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
        skip_aware = self.skip_policy is not None
        skipped = skip_aware and random.random() >= self.ft["full_depth_rate"]
        if skipped:
            # LayerDrop-style, but exactly the decode-time computation: prompt positions run every layer,
            # target position with generated-token index T runs only the policy's set for T.
            with layer_skipping(self.model, self.skip_policy, max_new_tokens=self.ft["skip_max_new_tokens"],
                                prompt_len=int(batch["prompt_len"])):
                loss = self._loss(batch)
            self.train_steps_skipped += 1
        else:
            loss = self._loss(batch)
        n = len(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        if skip_aware:  # the two kinds of step apart: does the model learn to work with the policy's layers?
            self.log(f"train/loss_{'skipped' if skipped else 'full_depth'}", loss, on_step=True, on_epoch=True,
                     batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        warmup = self.ft["warmup_steps"]
        if not warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: LoRA keeps the adapter only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ft["mode"] == "lora":
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
            checkpoint["hsd_adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("hsd_adapter_only"):  # the frozen base weights it leaves out: this model's own
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_batch(self, batch) -> tuple[list[str], list[list[int]]]:
        """Predictions for one batch and, per example, the decoder layers run for each generated token."""
        gen = self.generation_config
        start = time.perf_counter()
        out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  generation_config=gen)
        self.generate_seconds += time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
        per_step = list(self.skip_stats.last_call) if self.skip_stats is not None else []
        texts, layers = [], []
        for row in new.tolist():
            n = _generated_length(row, gen.eos_token_id, gen.pad_token_id)
            self.generated_tokens += n
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
            # Token k (k >= 1) of this row came out of decode step k-1, the forward that fed token k-1 back;
            # token 0 came out of the prefill, which Avg. Layer leaves out. So the row's steps are 0..n-2,
            # whatever the other rows of the batch did: a row that ends early must not count the step that
            # fed its last token back only because a longer row kept the batch going.
            layers.append(per_step[:max(n - 1, 0)] if per_step else [self.num_layers] * max(n - 1, 0))
        return texts, layers

    @torch.no_grad()
    def warm_up(self) -> None:
        """A 2-token generate() once per process before anything is timed."""
        if getattr(self, "_warm", False):
            return
        enc = self.tokenizer(["warm up"], return_tensors="pt").to(self.model.device)
        self.model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        self._warm = True

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def test_step(self, batch, batch_idx):
        texts, layers = self.generate_batch(batch)
        if self.on_generated is not None:
            self.on_generated(batch, texts, layers)


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
