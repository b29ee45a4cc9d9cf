"""The method: skip policies (which layers run per generated token) and the engine that applies them
inside Hugging Face ``generate()``.

Importing the package registers every policy (``policies.POLICIES``): the static ones in ``policies``,
CALM in ``calm``, the fixed early exit in ``early_exit``, SkipLayer in ``skiplayer`` (its router, which needs torch,
in ``router``). None imports torch, so the report can rebuild policies cheaply.
"""

from hsd_exp.skip import calm, early_exit, policies, skiplayer  # noqa: F401  (registers the policies)
