"""Skip-robust training recipes: what each fine-tuning step runs and which losses it adds.

One step draws its depth, then adds the losses the recipe asks for. Prompt positions always run every layer,
as at decode time; only target positions (generated-token index T >= 0) are skipped.

- Schedule-aware (``finetune.skip_aware`` / ``finetune.schedules``): with probability 1 - ``full_depth_rate`` a
  step runs a static schedule exactly as decoding will. ``schedules`` is a family: one member drawn uniformly per
  skipped step, so one model learns a range of settings (list-valued parameters expand to their grid).
- Self-distillation (``distill_weight`` = w): on skipped steps, next to the CE on the references,

      L = CE(skipped) + w * KL( p_full || p_skipped ),   p_full from the same model at full depth, no gradient.

- LayerSkip's layer dropout (``layer_dropout.p_max``, arXiv 2404.16710 eq. 1): on full-depth steps each row drops
  layer l (0-based, of L) for its target tokens with

      p_l = p_max * D(l),   D(l) = exp(l * ln 2 / (L - 1)) - 1     (0 at the bottom, 1 at the top),

  never the bottom ``keep_bottom`` layers.
- LayerSkip's early-exit loss (``exit_loss.scale`` = e_scale, eqs. 3-5): the LM head reads every layer's output,

      L = sum_l e~(t, l) * CE_l,   e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i),
      e(l) = e_scale * sum_{i=0}^{l} i  (l < L - 1),   e(L - 1) = (L - 1) + e_scale * sum_{i=0}^{L-2} i,

  with the rotational curriculum C(t, l) = 1 iff l = L - 1 or l = t mod R (R = ``rotation``), or C = 1 for every
  layer (``curriculum: none``). The last layer's e is the paper's eq. 4: L - 1 *on top of* the largest early
  scale, so the final exit carries the largest weight whatever e_scale (torchtune's ``sum_l_loss_scale``,
  torchtune/modules/early_exit_loss.py, likewise gives the last layer the cumulative sum of all the others';
  facebookresearch/LayerSkip's Hugging Face recipe weighs the last layer 1 against e_scale for the exit). At
  L = 30, e_scale = 1, no curriculum the last layer's share is 435 / 4495 = 9.7% (an e(L - 1) of L - 1 alone
  gave it 29 / 4089 = 0.7%). It also trains the early-exit drafts of lossless mode (``policy=early_exit``).
"""

from __future__ import annotations

import itertools
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsd_exp.errors import ConfigError
from hsd_exp.skip.policies import Policy, build_policy
from hsd_exp.skip.skiplayer import RunMasks

CURRICULA = ("rotational", "none")


# ----------------------------------------------------------------------------------------------- schedules
def schedule_family(nodes, num_layers: int | None = None) -> list[Policy]:
    """``finetune.schedules`` as policies: a node ``{name, param: value | [values], ...}`` (or a list of them)
    expands to the grid of its list-valued parameters, e.g. {name: hsd, s: [1, 2], max: [12, 18]} -> 4 policies."""
    nodes = [nodes] if isinstance(nodes, dict) else list(nodes or [])
    policies = []
    for node in nodes:
        if not isinstance(node, dict) or "name" not in node:
            raise ConfigError(f"finetune.schedules: {node!r} is not a policy node; write e.g. "
                              "{name: hsd, s: [1, 2], min: 0, max: [12, 18]}")
        params = {k: v for k, v in node.items() if k not in ("name", "_target_")}
        keys = list(params)
        grids = [v if isinstance(v, (list, tuple)) else [v] for v in params.values()]
        for values in itertools.product(*grids):
            policy = build_policy(node["name"], num_layers, **dict(zip(keys, values, strict=True)))
            if not policy.static:
                raise ConfigError(f"finetune.schedules: {policy.label} is not a static schedule; skip-aware training "
                                  "runs static policies (full, skipdecode, hsd, early_exit)")
            policies.append(policy)
    return list(dict.fromkeys(policies))  # one of each, in order


# ----------------------------------------------------------------------------------------------- layer dropout
def dropout_rates(num_layers: int, p_max: float, keep_bottom: int = 0) -> list[float]:
    """p_l = p_max * (exp(l ln 2 / (L - 1)) - 1) for 0-based l, 0 for l < keep_bottom."""
    if num_layers == 1:
        return [0.0]
    return [0.0 if i < keep_bottom else p_max * (math.exp(i * math.log(2) / (num_layers - 1)) - 1)
            for i in range(num_layers)]


@dataclass(frozen=True)
class LayerDropout(Policy):
    """A training-time per-token policy (not a decoding policy: it has no registry ``name``): each row drops
    layer l for all its target tokens with probability p_l (``dropout_rates``). The engine's per-token path
    runs it: dropped positions keep their input state, so gradients reach only the layers that ran."""

    p_max: float = 0.2
    keep_bottom: int = 0
    num_layers: int = 0  # L: set by Recipe.from_config (the engine's per-token protocol does not pass it)
    kind = "per_token"  # hsd_exp.skip.modes.PER_TOKEN

    def validate(self, num_layers: int | None = None) -> None:
        if not 0 <= self.p_max <= 1:
            raise ConfigError(f"finetune.layer_dropout.p_max={self.p_max} is out of range: must be in [0, 1]")
        if num_layers is not None and self.num_layers != num_layers:
            raise ValueError(f"LayerDropout was built for L={self.num_layers}, the model has {num_layers} layers")
        if not isinstance(self.keep_bottom, int) or self.keep_bottom < 0 or (
                num_layers is not None and self.keep_bottom > num_layers):
            raise ConfigError(f"finetune.layer_dropout.keep_bottom={self.keep_bottom} is out of range: must be an "
                              f"integer in [0, {num_layers or 'L'}]")

    def begin_forward(self, steps: list[int], device) -> _DropStep:
        return _DropStep(self, steps, device)


class _DropStep(RunMasks):
    """One forward's dropout draw: (B, L) dropped layers per row, sampled when the first layer asks."""

    def __init__(self, policy: LayerDropout, steps: list[int], device):
        super().__init__()
        self.policy = policy
        self.generated = torch.tensor([t >= 0 for t in steps], device=device)  # (Q,)
        self.gates: dict = {}  # no learned gate: the engine mixes outputs with torch.where only
        self.drop: torch.Tensor | None = None

    def decide(self, idx: int, h: torch.Tensor) -> torch.Tensor:
        if self.drop is None:  # one Bernoulli per (row, layer): a row loses a layer for all its target tokens
            p = self.policy
            rates = torch.tensor(dropout_rates(p.num_layers, p.p_max, p.keep_bottom), device=h.device)  # (L,)
            self.drop = torch.rand(h.shape[0], p.num_layers, device=h.device) < rates  # (B, L)
        run = ~(self.drop[:, idx:idx + 1] & self.generated.unsqueeze(0))  # (B, Q)
        self.runs.append(run)
        return run


# ----------------------------------------------------------------------------------------------- early-exit loss
def exit_weights(num_layers: int, step: int, scale: float, curriculum: str = "rotational",
                 rotation: int = 4) -> list[float]:
    """e~(t, l) for l = 0..L-1 (they sum to 1): see the module docstring (arXiv 2404.16710 eqs. 3-5)."""
    L = num_layers
    if L == 1:
        return [1.0]  # the final CE alone (e(0) = 0 would leave nothing to normalise)
    e = [scale * i * (i + 1) / 2 for i in range(L - 1)]  # e(l) = e_scale * sum_{i<=l} i
    e.append((L - 1) + scale * (L - 2) * (L - 1) / 2)  # e(L-1) = L-1 + e_scale * sum_{i<=L-2} i: the largest
    on = [curriculum == "none" or i == L - 1 or i % rotation == step % rotation for i in range(L)]
    total = sum(w for w, c in zip(e, on, strict=True) if c)
    return [w / total if c else 0.0 for w, c in zip(e, on, strict=True)]


@contextmanager
def layer_outputs(layers):
    """Collect each decoder layer's output hidden state (B, Q, C) during the forwards inside: {idx: tensor}."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(layers):
        def hook(module, args, out, idx=idx):
            outputs[idx] = out[0] if isinstance(out, tuple) else out
        handles.append(layer.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, Q-1) bool: position q's logits predict a target token (labels[q+1] != -100), as the causal LM loss scores."""
    return labels[:, 1:] != -100


def early_exit_loss(outputs: dict[int, torch.Tensor], final_ce: torch.Tensor, labels: torch.Tensor, readout,
                    weights: list[float]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """sum_l weights[l] * CE_l: CE_l from ``readout`` (final norm + LM head) on layer l's output at the target
    positions; the last layer's is ``final_ce`` (the model's own loss). Returns the loss and each CE_l used."""
    mask = target_mask(labels)
    targets = labels[:, 1:][mask]  # (N,)
    last = len(weights) - 1
    per_layer, loss = {last: final_ce}, weights[last] * final_ce
    for idx, w in enumerate(weights[:-1]):
        if w == 0.0:
            continue
        h = outputs[idx][:, :-1][mask]  # (N, C): only the scored positions meet the (large) LM head
        per_layer[idx] = F.cross_entropy(readout(h).float(), targets)
        loss = loss + w * per_layer[idx]
    return loss, per_layer


# ----------------------------------------------------------------------------------------------- distillation
def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), averaged over the positions whose logits predict a target token."""
    mask = target_mask(labels)
    s = student_logits[:, :-1][mask].float().log_softmax(-1)  # (N, V)
    t = teacher_logits[:, :-1][mask].float().log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


# ----------------------------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class Recipe:
    """What ``finetune`` asks of each training step (see the module docstring)."""

    schedules: tuple[Policy, ...] = ()  # empty: no skipped steps
    full_depth_rate: float = 1.0
    distill_weight: float = 0.0
    dropout: LayerDropout | None = None
    exit_scale: float = 0.0
    curriculum: str = "rotational"
    rotation: int = 4

    @classmethod
    def from_config(cls, ft: dict, policy: Policy | None = None, num_layers: int | None = None) -> Recipe:
        """``finetune`` (resolved) as a recipe; ``policy``: the run's policy, the schedule of plain skip-aware
        training (``skip_aware: true`` without ``schedules``). Raises ConfigError naming a bad key."""
        schedules = schedule_family(ft.get("schedules"), num_layers)
        if not schedules and ft.get("skip_aware"):
            if policy is None or not policy.static:
                raise ConfigError("finetune.skip_aware=true needs a static policy (policy=hsd, skipdecode, ...) or "
                                  "finetune.schedules")
            schedules = [policy]
        rate = ft.get("full_depth_rate", 0.5) if schedules else 1.0
        if not 0 <= rate <= 1:
            raise ConfigError(f"finetune.full_depth_rate={rate} is out of range: must be in [0, 1]")
        w = ft.get("distill_weight") or 0.0
        if w < 0:
            raise ConfigError(f"finetune.distill_weight={w} is out of range: must be >= 0 (0 = off)")
        drop = ft.get("layer_dropout") or {}
        dropout = None
        if drop.get("p_max"):
            dropout = LayerDropout(p_max=drop["p_max"], keep_bottom=drop.get("keep_bottom", 0),
                                   num_layers=num_layers or 0)
            dropout.validate(num_layers)
        ex = ft.get("exit_loss") or {}
        curriculum, rotation = ex.get("curriculum", "rotational"), ex.get("rotation", 4)
        if curriculum not in CURRICULA:
            raise ConfigError(f"finetune.exit_loss.curriculum={curriculum} is unknown; choose one of "
                              f"{', '.join(CURRICULA)}")
        if not isinstance(rotation, int) or rotation < 1:
            raise ConfigError(f"finetune.exit_loss.rotation={rotation} is out of range: must be an integer >= 1")
        scale = ex.get("scale") or 0.0
        if scale < 0:
            raise ConfigError(f"finetune.exit_loss.scale={scale} is out of range: must be >= 0 (0 = off)")
        return cls(tuple(schedules), rate, w, dropout, scale, curriculum, rotation)

    @property
    def plain(self) -> bool:
        """Plain fine-tuning: every step full depth, the CE alone."""
        return not self.schedules and self.dropout is None and not self.exit_scale

    def draw(self, rng=random) -> tuple[str, Policy | None]:
        """This step's depth: ("skipped", a schedule), ("dropout", LayerDropout) or ("full_depth", None)."""
        if self.schedules and rng.random() >= self.full_depth_rate:
            return "skipped", rng.choice(self.schedules)
        if self.dropout is not None:
            return "dropout", self.dropout
        return "full_depth", None
