"""LightningModule around a Hugging Face causal LM: fine-tuning (full / LoRA) and generation for evaluation."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import pytorch_lightning as pl
import torch
from transformers import GenerationConfig

from hsd_exp.errors import ConfigError
from hsd_exp.families import decoder_layers, family_of
from hsd_exp.skip.engine import layer_skipping
from hsd_exp.skip.policies import Policy

log = logging.getLogger(__name__)


def apply_lora(model, lora_cfg: dict):
    """Wrap ``model`` in a peft LoRA adapter; target modules default to the family table's."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.get("target_modules") or family_of(model).lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(
            f"finetune.lora.target_modules: {', '.join(missing)} not found in the model; "
            f"its linear modules are: {', '.join(linear)}"
        )
    config = LoraConfig(r=lora_cfg.get("r", 16), lora_alpha=lora_cfg.get("alpha", 32),
                        lora_dropout=lora_cfg.get("dropout", 0.05), target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class CausalLMModule(pl.LightningModule):
    """Training: next-token loss on target tokens (labels = -100 elsewhere), AdamW.

    Evaluation (``trainer.test`` / ``trainer.predict``): ``generate()`` with the ``decode`` config; the skip
    policy is applied by ``SkipPolicyCallback`` around the whole loop, and each batch's per-token layer
    counts are read back from ``self.skip_stats`` (set by that callback).
    """

    def __init__(self, model, tokenizer, finetune: dict | None = None, decode: dict | None = None,
                 skip_policy: Policy | None = None):
        super().__init__()
        self.ft = dict(finetune or {"mode": "none"})
        self.decode = dict(decode or {})
        self.tokenizer = tokenizer
        if self.ft.get("mode") == "lora":
            model = apply_lora(model, dict(self.ft.get("lora") or {}))
        self.model = model
        self.skip_policy = skip_policy  # skip-aware training only; decoding uses the callback's policy
        self.skip_stats = None  # set by SkipPolicyCallback while testing/predicting
        self.on_generated = None  # callback(batch, predictions, layers_per_token) set by the writer callback
        self.generate_seconds = 0.0
        self.generated_tokens = 0
        self.train_steps_skipped = 0

    # ------------------------------------------------------------------ training
    def forward(self, **batch):
        return self.model(**batch)

    def _loss(self, batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        return self.model(**inputs).loss

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        policy = self.skip_policy
        if self.ft.get("skip_aware") and policy is not None and not policy.static:
            # Training forwards have no cache and see every target position at once; a dynamic policy (CALM)
            # decides per token from cached decoding. Only training is refused: evaluating with it is fine.
            raise ConfigError(f"finetune.skip_aware=true needs a static policy (full, skipdecode, hsd), not "
                              f"{policy.label}; train with e.g. policy=hsd_s1_max18 or set finetune.skip_aware=false")
        if self.ft.get("mode") == "full":
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
        skip_aware = bool(self.ft.get("skip_aware")) and self.skip_policy is not None
        skipped = skip_aware and random.random() >= self.ft.get("full_depth_rate", 0.5)
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
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.ft.get("lr", 5e-5), weight_decay=self.ft.get("weight_decay", 0.0))
        warmup = int(self.ft.get("warmup_steps") or 0)
        if not warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: LoRA keeps the adapter only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ft.get("mode") == "lora":
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
            checkpoint["hsd_adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("hsd_adapter_only"):  # fill in the frozen base weights we did not save
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    # ------------------------------------------------------------------ generation
    def generation_config(self) -> GenerationConfig:
        d = self.decode
        sample = bool(d.get("do_sample", False))
        kw = dict(max_new_tokens=int(d["max_new_tokens"]), num_beams=int(d.get("num_beams", 1)), do_sample=sample,
                  repetition_penalty=float(d.get("repetition_penalty", 1.0)),
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if sample:
            kw.update(temperature=float(d.get("temperature", 1.0)), top_p=float(d.get("top_p", 1.0)))
        return GenerationConfig(**kw)

    @torch.no_grad()
    def generate_batch(self, batch) -> tuple[list[str], list[list[int]]]:
        """Predictions for one batch and, per example, the decoder layers run for each generated token."""
        gen = self.generation_config()
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

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> Any:
        texts, layers = self.generate_batch(batch)
        if self.on_generated is not None:
            self.on_generated(batch, texts, layers)
        return texts


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
