"""Models: where they come from and how the engine finds its way around them.

- ``loading``: the offline-first registry behind ``conf/model/*.yaml`` (``load_model`` -> ``LoadedModel``).
- ``layout``: a decoder's layer layout read off the model (``layout_of`` -> ``LayerLayout``: stack, layers, norms,
  LM head, attention and MLP of a layer), so no code branches on model names.
- ``tiny``: seeded random configs of each tested family (fast tests) and the offline GGUF weights' conversion.
- ``shipped``: the adapters we trained and ship (``model.adapter=<name>``) and their export
  (``python -m hsd_exp.models.shipped``).

``hsd_exp.models.load_model`` (the presets' ``_target_``) is imported on first use, so importing one submodule
(the engine imports ``layout``) loads nothing else.
"""

from importlib import import_module

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("hsd_exp.models.loading"), name)
    raise AttributeError(f"module 'hsd_exp.models' has no attribute {name!r}")
