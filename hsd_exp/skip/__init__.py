"""The method: skip policies (which layers run per generated token) and the engine that applies them
inside Hugging Face ``generate()``.

    policies, calm, early_exit, skiplayer   the policies (one class each; ``modes`` names their three kinds)
    engine (state, cache, partial, stats)   layer_skipping / SkipEngine: wrappers, per-call state, SkipCache, the
                                            K/V-only and per-row layer paths, SkipStats
    lossless (rounds, drafts, choose)       lossless mode: its settings and stats, the round loop, the draft
                                            strategies, token choice and acceptance
    router                                  SkipLayer's learned router (torch)

Importing the package registers every policy (``policies.POLICIES``) and imports no torch (nor does
``LosslessSettings``), so the report and preflight can rebuild policies and check settings cheaply.
"""

from hsd_exp.skip import calm, early_exit, policies, skiplayer  # noqa: F401  (registers the policies)
from hsd_exp.skip.lossless import LosslessSettings

__all__ = ["LosslessSettings"]
