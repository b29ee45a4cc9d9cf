"""SkipLayer's learned router (arXiv 2311.15436): one gate per decoder layer decides, per token, run or skip.

For routed layer l (1-indexed) and the hidden state h_l that enters it (one token):

    p_l(h) = sigmoid(g_l(h))        g_l = w . h + b                       (kind="linear")
                                    g_l = w2 . relu(W1 . norm(h)) + b     (kind="mlp", d -> d/16 -> 1, FlexiDepth)
    run_l(h) = p_l(h) >= threshold

Training uses the hard decision in the forward pass and the soft gate's gradient (straight-through):
    z = run + p - stopgrad(p)   (estimator="ste"), or the Gumbel-sigmoid sample of the same form ("gumbel"),
and the layer's output becomes h + z * (layer(h) - h): h itself where the token skips, the layer's output where
it runs, with gradient reaching the gate either way. The density loss pulls the run rate toward a target:

    L_density = sum_l (r_l - P)^2,   r_l = mean over target tokens of z_l,   P = ``density``

Layers in ``always_run`` (1-indexed) have no gate and always run. A gate starts dense (bias ``init_bias``, so
p = sigmoid(1) ~ 0.73 and every layer runs) and the density loss pulls it down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from hsd_exp.errors import ConfigError
from hsd_exp.skip.params import check_threshold

KINDS = ("linear", "mlp")
ESTIMATORS = ("ste", "gumbel")
ROUTER_FILE, CONFIG_FILE = "router.safetensors", "router.json"


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard decision, exactly 0 or 1 (hard + soft - soft.detach() is off by rounding).
    Backward: the gradient goes to the soft gate."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


class _Gate(nn.Module):
    """g_l(h): (B, Q, C) -> (B, Q) logits."""

    def __init__(self, hidden: int, kind: str, bottleneck: int, init_bias: float):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(hidden, 1)
        else:  # FlexiDepth's bottleneck: a normed d -> d/16 -> 1 MLP (much better than linear in its ablation)
            self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, max(hidden // bottleneck, 1)),
                                     nn.ReLU(), nn.Linear(max(hidden // bottleneck, 1), 1))
        last = self.net if kind == "linear" else self.net[-1]
        nn.init.zeros_(last.weight)  # start at p = sigmoid(init_bias) for every token: dense
        nn.init.constant_(last.bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.bias_dtype()
        return self.net(h if h.dtype == dtype else h.to(dtype)).squeeze(-1).float()  # (B, Q)

    def bias_dtype(self) -> torch.dtype:
        return (self.net if isinstance(self.net, nn.Linear) else self.net[-1]).bias.dtype


class SkipRouter(nn.Module):
    """Gates for the routed decoder layers of one model. ``decide`` is what decoding asks, ``gate`` what training
    uses; ``save`` / ``load`` keep it as safetensors with its config."""

    SETTINGS = ("kind", "always_run", "threshold", "estimator", "temperature", "bottleneck", "init_bias")

    def __init__(self, num_layers: int, hidden_size: int, kind: str = "mlp", always_run: list[int] | None = None,
                 threshold: float = 0.5, estimator: str = "ste", temperature: float = 1.0, bottleneck: int = 16,
                 init_bias: float = 1.0):
        super().__init__()
        check_router_config(kind=kind, always_run=always_run, threshold=threshold, estimator=estimator,
                            num_layers=num_layers)
        self.config = dict(num_layers=num_layers, hidden_size=hidden_size, kind=kind,
                           always_run=sorted(always_run or []), threshold=threshold, estimator=estimator,
                           temperature=temperature, bottleneck=bottleneck, init_bias=init_bias)
        self.num_layers, self.threshold = num_layers, threshold
        self.routed = [i for i in range(num_layers) if i + 1 not in set(always_run or [])]  # 0-based
        self.gates = nn.ModuleDict({str(i): _Gate(hidden_size, kind, bottleneck, init_bias) for i in self.routed})

    @classmethod
    def for_model(cls, model: nn.Module, **router_cfg) -> SkipRouter:
        """A dense-initialised router for ``model`` (its depth and width), on the model's device."""
        from hsd_exp.models.layout import decoder_layers

        text = model.config.get_text_config()
        router = cls(num_layers=len(decoder_layers(model)), hidden_size=text.hidden_size, **router_cfg)
        return router.to(next(model.parameters()).device)

    def is_routed(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.gates

    def probs(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """p_l(h) for every token: (B, Q, C) -> (B, Q); 1 for an always-run layer."""
        if not self.is_routed(layer_idx):
            return torch.ones(h.shape[:2], device=h.device)
        return torch.sigmoid(self.gates[str(layer_idx)](h))

    @torch.no_grad()
    def decide(self, layer_idx: int, h: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """run_l(h) = p_l(h) >= threshold, i.e. g_l(h) >= logit(threshold): (B, Q, C) -> (B, Q) bool, True = run.
        (Compared on the logit: one op fewer per layer and token than the sigmoid.)"""
        if not self.is_routed(layer_idx):
            return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        t = self.threshold if threshold is None else threshold
        return self.gates[str(layer_idx)](h) >= math.log(t / (1 - t))

    def gate(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Training: the hard decision with the soft gate's gradient, (B, Q) float in {0, 1}."""
        if not self.is_routed(layer_idx):
            return torch.ones(h.shape[:2], device=h.device)
        logits = self.gates[str(layer_idx)](h)  # (B, Q)
        if self.config["estimator"] == "gumbel" and self.training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = (logits + torch.log(u) - torch.log1p(-u)) / self.config["temperature"]  # logistic noise
        soft = torch.sigmoid(logits)
        return _StraightThrough.apply((soft >= self.threshold).float(), soft)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / ROUTER_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> SkipRouter:
        """A saved router; with ``model``, checked against its depth and width and moved to its device."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / ROUTER_FILE).is_file():
            raise ConfigError(f"{directory} holds no router ({CONFIG_FILE} + {ROUTER_FILE}); train one with "
                              "task=finetune finetune.router=true")
        config = json.loads((directory / CONFIG_FILE).read_text())
        router = cls(**config)
        router.load_state_dict(load_file(directory / ROUTER_FILE))
        if model is not None:
            router.check_model(model)
            router = router.to(next(model.parameters()).device)
        return router

    def check_model(self, model: nn.Module) -> None:
        from hsd_exp.models.layout import decoder_layers

        L, d = len(decoder_layers(model)), model.config.get_text_config().hidden_size
        if (L, d) != (self.num_layers, self.config["hidden_size"]):
            raise ConfigError(f"the router was trained for {self.num_layers} layers of width "
                              f"{self.config['hidden_size']}, but the model has {L} of width {d}: use the "
                              "checkpoint trained with this model")


def density_loss(run_rates: list[torch.Tensor], density: float) -> torch.Tensor:
    """sum_l (r_l - P)^2 over the routed layers' run rates r_l (each a 0-dim tensor)."""
    if not run_rates:
        return torch.zeros(())
    rates = torch.stack(run_rates)
    return ((rates - density) ** 2).sum()


def run_rate(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_l: the mean gate over target tokens. z, mask: (B, Q); mask is True at routed (generated) positions."""
    m = mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


def check_router_config(kind: str = "mlp", always_run: list[int] | None = None, threshold: float = 0.5,
                        estimator: str = "ste", density: float | None = None, num_layers: int | None = None,
                        **_: object) -> None:
    """Every router value a user sets, checked before the model loads; ConfigError names value and fix."""
    if kind not in KINDS:
        raise ConfigError(f"router.kind={kind} is unknown; choose one of {', '.join(KINDS)}")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"router.estimator={estimator} is unknown; choose one of {', '.join(ESTIMATORS)}")
    check_threshold(threshold, "router.threshold")
    if density is not None and (isinstance(density, bool) or not isinstance(density, int | float)
                                or not 0 < density <= 1):
        raise ConfigError(f"router.density={density} is out of range: must be in (0, 1] (the target share of "
                          "routed layers each token runs)")
    for i in always_run or []:
        if isinstance(i, bool) or not isinstance(i, int) or i < 1 or (num_layers is not None and i > num_layers):
            top = num_layers if num_layers is not None else "L"
            raise ConfigError(f"router.always_run has {i}: layers are 1-indexed in [1, {top}]")


__all__ = ["SkipRouter", "check_router_config", "density_loss", "run_rate"]
