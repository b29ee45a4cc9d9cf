"""SkipLayer (arXiv 2311.15436) as a policy: a learned router decides, per token and per decoder layer, run or skip.

For generated token T at layer l (1-indexed) with input hidden state h_l:

    run_l(h_l) = p_l(h_l) >= threshold        (p_l: the router's gate, hsd_exp.skip.router)
    h_{l+1} = layer_l(h_l) if run_l else h_l  (a skipped token passes its state through ...)

... and still writes its K/V at layer l, from h_l, with layer l's own projections (SkipLayer's partial skipping),
so the cache stays complete: later tokens attend to every position at every layer, decisions may differ between
rows and beams, and beam reordering needs nothing special. Prompt tokens run every layer, as for every policy.

The engine asks ``RouterStep.decide(idx, h)`` at each layer: (B, Q) decisions (or straight-through gates while
training). torch is only used inside the methods, so the report can import this module to name rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hsd_exp.errors import ConfigError
from hsd_exp.skip.modes import PER_TOKEN
from hsd_exp.skip.params import check_number, check_threshold, fmt
from hsd_exp.skip.policies import Policy


@dataclass(frozen=True)
class SkipLayer(Policy):
    """SkipLayer's learned router: run layer l for a token when p_l(h_l) >= ``threshold``.

    ``router`` (a SkipRouter) comes from the checkpoint that trained it (``ckpt_path``) or from Python
    (``build_policy("skiplayer", router=router)``); ``threshold`` trades quality for depth without retraining.
    """

    threshold: float = 0.5
    router: Any = field(default=None, compare=False, repr=False)
    name = "skiplayer"
    title = "SkipLayer"
    kind = PER_TOKEN  # decisions per row and position: the engine routes every forward, cached or not
    objects = ("router",)
    order = 4
    style = ("tab:purple", "P")

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return ("threshold",)  # the router is weights, not a parameter: it lives in the checkpoint

    @property
    def display_name(self) -> str:
        return f"SkipLayer (threshold={fmt(self.threshold)})"

    def validate(self, num_layers: int | None = None) -> None:
        check_number("threshold", self.threshold, "a number in (0, 1) (0.5 = the gate's decision boundary)")
        check_threshold(self.threshold, "policy.threshold")
        if num_layers is not None and self.router is not None and self.router.num_layers != num_layers:
            raise ConfigError(f"the router was trained for {self.router.num_layers} layers, the model has "
                              f"{num_layers}: evaluate it with the model its checkpoint was trained on")

    def with_router(self, router) -> SkipLayer:
        from dataclasses import replace

        return replace(self, router=router)

    def begin_forward(self, steps: list[int], device) -> RouterStep:
        """The decisions of one forward whose query positions hold generated-token indices ``steps``
        (T < 0: a prompt position, which runs every layer)."""
        if self.router is None:
            raise ConfigError("policy=skiplayer needs a trained router: evaluate a checkpoint trained with "
                              "finetune.router=true (ckpt_path=...), or pass build_policy('skiplayer', "
                              "router=SkipRouter.load(dir, model))")
        return RouterStep(self.router, self.threshold, steps, device)


class RunMasks:
    """What one forward of a per-token policy ran: a (B, Q) bool mask per layer so far (``runs``), and what the
    engine's records read off them."""

    def __init__(self):
        self.runs: list = []  # per layer so far: (B, Q) bool, True = ran

    @property
    def counts(self):
        """(B, Q) layers run so far, per row and position."""
        import torch

        return torch.stack(self.runs).sum(0)

    def rows_per_layer(self) -> list[int]:
        """For each layer so far, how many rows ran it at the last position (what the FLOP model needs)."""
        import torch

        return torch.stack([run[:, -1] for run in self.runs]).sum(1).tolist() if self.runs else []


class RouterStep(RunMasks):
    """One forward's routing: per layer, which (row, position) pairs run. Records what each row ran."""

    def __init__(self, router, threshold: float, steps: list[int], device):
        import torch

        super().__init__()
        self.router, self.threshold = router, threshold
        self.generated = torch.tensor([t >= 0 for t in steps], device=device)  # (Q,) routed positions
        self.prompt_too = min(steps) < 0  # some positions are prompt positions, which run every layer
        self.gates: dict[int, Any] = {}  # training: layer idx -> (B, Q) straight-through gate
        router.last_step = self  # training reads the gates back for the density loss

    def decide(self, idx: int, h):
        """(B, Q) bool: run layer ``idx`` (0-based) at each row and position; h is its input (B, Q, C).
        While the router trains, also keeps the straight-through gate for the engine's mix and the density loss."""
        import torch

        if self.router.training and torch.is_grad_enabled():
            z = self.router.gate(idx, h)  # (B, Q), exactly 0/1 forward, soft gradient
            z = torch.where(self.generated, z, torch.ones_like(z))  # prompt positions always run
            self.gates[idx] = z
            run = z.detach() > 0.5
        else:  # decoding: a handful of small ops per layer, so they stay few (batch 1 pays them per token)
            run = self.router.decide(idx, h, self.threshold)
            if self.prompt_too:
                run = run | ~self.generated
        self.runs.append(run)
        return run
