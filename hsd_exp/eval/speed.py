"""What metrics.json records of a run's speed, and the FLOP ideal a measured speedup must stay under.

Per batch the module's ``StepTimer`` (hsd_exp.eval.step_timer) gives the prefill's seconds, the batch's decode steps
and their seconds; ``SpeedLog`` sums them over a run's batches:

    ms_per_step = 1000 * sum_b decode_seconds_b / sum_b decode_steps_b   (a batch's decode step: the mean over
                                                                         batches, weighted by their steps)
    prefill_ms  = 1000 * mean_b prefill_seconds_b                        (one batch's prompt pass)
    tokens_per_s = sum_b tokens_b / sum_b seconds_b                      (tokens up to each row's EOS: output-length
                                                                         dependent, kept as it was)

The report's Speedup is ms_per_step(Full) / ms_per_step(run): how much cheaper one decode step of the batch is,
whatever the rows write. A lossless run has no timer (its rounds are not steps): its Speedup stays the wall time
per generated token, tokens_per_s(run) / tokens_per_s(Full), fair there because its output is Full's.

FLOP ideal (``flop_ideal``), per decode step t of the run (hsd_exp.flops' per-layer counts f_i, K/V-only writes
kv_i, head h = 2 d V, context c):

    ideal = sum_t [ sum_{i=1..L} (f_i + 4 c d) + h ] / sum_t [ sum_{i in run_t} (f_i + 4 c d) + sum_{i in kv_t} kv_i
                                                               + h (1 + evals_t) ]

what the layers a policy ran cost against the full depth's, at the steps it ran. A per-token policy's step (rows
differ) counts its rows' mean number of layers, and the rest as K/V writes. No measured speedup can honestly
exceed it by more than noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsd_exp.flops import kv_only_flops, layer_flops
from hsd_exp.models.layout import layout_of
from hsd_exp.skip.stats import SkipStats

SPEED_KEYS = ("tokens", "seconds", "decode_steps", "decode_seconds", "prefill_seconds", "timed_batches",
              "context_tokens")


@dataclass
class SpeedLog:
    """One process's sums over its batches (``add`` per batch); ``summary`` is what metrics.json records."""

    tokens: int = 0
    seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    timed_batches: int = 0  # batches with a StepTimer (none for lossless)
    context_tokens: float = 0.0  # sum over timed batches of (prompt length + steps / 2) * steps: the mean context

    def add(self, batch, prompt_len: int) -> None:
        """One ``GeneratedBatch`` (hsd_exp.train.module) of a batch whose padded prompts are ``prompt_len`` long."""
        self.tokens += batch.tokens
        self.seconds += batch.seconds
        if batch.prefill_seconds is not None:
            self.timed_batches += 1
            self.prefill_seconds += batch.prefill_seconds
            self.decode_steps += batch.decode_steps
            self.decode_seconds += batch.decode_seconds
            self.context_tokens += (prompt_len + batch.decode_steps / 2) * batch.decode_steps

    def as_list(self) -> list[float]:
        return [float(getattr(self, k)) for k in SPEED_KEYS]

    @classmethod
    def merged(cls, ranks: list[list[float]]) -> SpeedLog:
        """Every rank's sums (``as_list``), the ranks having run in parallel: time is the slowest rank's."""
        log = cls()
        for values in ranks:
            for key, value in zip(SPEED_KEYS, values, strict=True):
                setattr(log, key, getattr(log, key) + value)
        log.seconds = max((values[SPEED_KEYS.index("seconds")] for values in ranks), default=0.0)
        log.tokens = int(log.tokens)
        return log

    @property
    def context(self) -> float:
        """The mean context length over the decode steps (prompt + tokens before), for the FLOP ideal."""
        return self.context_tokens / self.decode_steps if self.decode_steps else 0.0

    def summary(self) -> dict:
        return {
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "ms_per_step": 1000.0 * self.decode_seconds / self.decode_steps if self.decode_steps else None,
            "prefill_ms": 1000.0 * self.prefill_seconds / self.timed_batches if self.timed_batches else None,
            "decode_steps": self.decode_steps,
        }


def flop_ideal(model, stats: SkipStats | None, context: float) -> float | None:
    """The module docstring's ideal over every decode step ``stats`` recorded; 1.0 without a policy (plain
    decoding), None when no step was recorded or the run was lossless (its drafts and verifications are
    hsd_exp.flops.lossless_decode_flops's)."""
    if stats is None:
        return 1.0
    if stats.lossless is not None or not stats.per_step:
        return None
    per_layer, per_attn, d, vocab = layer_flops(model)
    kv = kv_only_flops(model) if layout_of(model).kv_rope else [a + 4 * context * d for a in per_attn]
    L, head = len(per_layer), 2 * d * vocab
    layer = [f + 4 * context * d for f in per_layer]
    full = sum(layer) + head
    spent = 0.0
    for t, count in enumerate(stats.per_step):
        run, extra, evals = stats.step_layers[t], stats.kv_only[t], stats.confidence_evals[t]
        if run:  # the layers this step ran; CALM: the `extra` layers above its exit wrote K/V only
            cost = sum(layer[i] for i in run) + sum(kv[i] for i in range(L - int(extra), L))
        else:  # a per-token policy: its rows' mean number of layers (rows differ), the rest K/V writes
            cost = count * sum(layer) / L + extra * sum(kv) / L
        spent += cost + head * (1 + evals)
    return full * len(stats.per_step) / spent


def lossless_layer_forwards(stats: SkipStats | None) -> float | None:
    """Decoder-layer forwards per committed token of a lossless run: its drafts' layers, its verify forwards'
    layers (L, or L - E above the exact bottom E) and each verification's bottom-only pass (E), over the tokens
    committed after the prefill. A verify forward over k + 1 positions counts its layers once: they run once, on
    k + 1 positions. None for a run that is not lossless."""
    ll = None if stats is None else stats.lossless
    if ll is None or not ll.committed:
        return None
    return (sum(ll.draft_layers) + ll.verified_layers + ll.exact_bottom * ll.verifications) / ll.committed
