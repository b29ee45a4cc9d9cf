"""Models: where they come from and how the engine finds its way around them.

- ``loading``: the offline-first registry behind ``conf/model/*.yaml`` (``load_model`` -> ``LoadedModel``).
- ``layout``: a decoder's layer layout read off the model (``layout_of`` -> ``LayerLayout``: stack, layers, norms,
  LM head, attention and MLP of a layer), so no code branches on model names.
- ``tiny``: seeded random configs of each tested family (fast tests) and the offline GGUF weights' conversion.
- ``shipped``: the adapters we trained and ship (``model.adapter=<name>``) and their export
  (``python -m hsd_exp.models.shipped``).
"""

from hsd_exp.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
