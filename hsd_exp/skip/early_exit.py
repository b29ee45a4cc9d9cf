"""Early exit at a fixed layer (LayerSkip-style drafts): every generated token runs the bottom E layers.

    run { i : 1 <= i <= E }     for every generated token T; the LM head reads layer E's output

Static and monotone (the same set at every T), so cached decoding stays exact. Its layers below E compute
exactly what the full model computes, which makes it the natural draft of lossless mode (``decode=lossless``):
a draft token's K/V at layers 1..E are the full model's. No torch here: the report rebuilds it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsd_exp.errors import ConfigError
from hsd_exp.skip.policies import Policy


@dataclass(frozen=True)
class EarlyExit(Policy):
    """Every generated token runs layers 1..E (``layer``) and exits there: { i : i <= E }."""

    layer: int = 12
    name = "early_exit"
    title = "Early exit"
    order = 5
    style = ("tab:brown", "v")

    @property
    def label(self) -> str:
        return f"early_exit(E={self.layer})"

    @property
    def display_name(self) -> str:
        return f"Early exit (E={self.layer})"

    def validate(self, num_layers: int | None = None) -> None:
        top = "L" if num_layers is None else f"L={num_layers}"
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1 or (
                num_layers is not None and self.layer > num_layers):
            raise ConfigError(f"policy.layer={self.layer} is out of range: must be an integer in [1, {top}] (the "
                              "exit layer E, 1-indexed)")

    def layers(self, step: int, max_steps: int, num_layers: int) -> tuple[int, ...]:
        return tuple(range(self.layer))
