"""Where a model keeps its decoder stack, layers, final norm and LM head: read off the model itself.

Everything downstream (the skip engine, the partial-layer paths, FLOP counts) looks modules up
through ``layout_of(model)``, so no code branches on model names. Families are not typed into a table: the
standard transformers layout says where everything is, so any decoder in it is served without a new row:

    stack       model.get_decoder()                     (LlamaModel, GPT2Model, OPTDecoder, ...)
    layers      the stack's ModuleList of num_hidden_layers layers (``layers``, ``h``)
    final_norm  the stack's one norm module (``norm``, ``ln_f``, ``final_layernorm``, ``final_layer_norm``)
    lm_head     model.get_output_embeddings()
    attn, mlp   the layer's ``*Attention`` and ``*MLP`` children
    norms       by their standard names (``ATTN_NORMS``, ``MLP_NORMS``); no MLP norm = a parallel block (Phi)
    kv_rope     the LLaMA attention layout (q/k/v/o_proj, head_dim, full RoPE): a K/V-only write is exact

``IRREGULAR`` holds what the layout cannot say (OPT's MLP is three layer attributes, not a module). A model the
engine cannot serve fails here, before any generation, with one line naming its model_type and what is missing.
``TESTED`` lists the model_types whose exactness the tests check (tests/skip/test_families_exactness.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch.nn as nn

from hsd_exp.errors import ConfigError


@dataclass(frozen=True)
class LayerLayout:
    name: str  # transformers' config.model_type
    stack: str  # the decoder stack module (runs embeddings, mask, layers, final norm)
    layers: str  # nn.ModuleList of decoder layers, relative to the top-level model
    final_norm: str  # norm applied before the LM head
    lm_head: str
    attn: str  # attention submodule inside one decoder layer
    attn_norm: str  # the norm in front of the attention inside one decoder layer
    mlp: str | tuple[str, ...]  # the MLP inside one decoder layer; a tuple: layer attributes applied in turn (OPT)
    mlp_norm: str | None  # the norm in front of the MLP; None: a parallel block (the MLP reads attn_norm's output)
    kv_rope: bool = False  # LLaMA-layout attention (k_proj, v_proj, head_dim, RoPE): K/V-only writes need no more
    parallel: bool = False  # attention and MLP read the same input h (Phi, GPT-NeoX); implied by mlp_norm None
    attn_out_norm: str | None = None  # a norm on the attention's output before the residual add (Gemma)
    mlp_out_norm: str | None = None  # a norm on the MLP's output before the residual add (Gemma)


TESTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi", "phi3", "gpt2", "opt", "gpt_neox")

ATTN_NORMS = ("input_layernorm", "ln_1", "self_attn_layer_norm")
MLP_NORMS = ("post_attention_layernorm", "ln_2", "final_layer_norm")
SANDWICH = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma 2/3
MLP_NAMES = ("mlp", "feed_forward", "ffn")

# Rows only for what the standard layout cannot say: model_type -> LayerLayout fields.
IRREGULAR: dict[str, dict] = {
    "opt": {"mlp": ("fc1", "activation_fn", "fc2")},  # no MLP module: fc1, activation, fc2 sit in the layer
}


def layout_of(model: nn.Module) -> LayerLayout:
    """The layer layout of a Hugging Face causal LM (unwraps peft/Lightning wrappers first); ConfigError (a
    ValueError) naming the model_type and what is missing when the engine cannot serve it."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)

    def cannot(why: str) -> ConfigError:
        return ConfigError(
            f"model_type '{model_type}' ({type(model).__name__}) cannot be served by the layer-skip engine: {why}; "
            "it needs a decoder in the standard transformers layout (or a row in hsd_exp/models/layout.py IRREGULAR)"
        )

    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    stack = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if stack is None or text is None:
        raise cannot("no decoder stack (model.get_decoder())")
    for what, bad in _refusals(text, stack):
        if bad:
            raise cannot(what)
    depth = getattr(text, "num_hidden_layers", None)
    lists = [m for m in stack.children() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(lists) != 1:
        raise cannot(f"no single list of num_hidden_layers={depth} decoder layers in its decoder stack")
    norms = [m for m in stack.children() if _is_norm(m)]
    if len(norms) != 1:
        raise cannot(f"{len(norms)} norm modules beside the layers in its decoder stack, not one final norm")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Module):
        raise cannot("no LM head (model.get_output_embeddings())")

    layer = lists[0][0]
    parts = dict(layer.named_children())
    attn = _one(parts, lambda n, m: "Attention" in type(m).__name__)
    if attn is None:
        raise cannot(f"no single attention submodule (a child whose class is *Attention) in {type(layer).__name__}")
    attn_norm = next((n for n in ATTN_NORMS if n in parts), None)
    if attn_norm is None:
        raise cannot(f"no norm before the attention ({' / '.join(ATTN_NORMS)}) in {type(layer).__name__}")
    mlp = IRREGULAR.get(model_type, {}).get("mlp") or _one(parts, lambda n, m: n in MLP_NAMES or "MLP" in type(m).__name__)
    if mlp is None:
        raise cannot(f"no single MLP submodule ({' / '.join(MLP_NAMES)} or a *MLP class) in {type(layer).__name__}")
    if all(n in parts for n in SANDWICH):  # Gemma: norms after attention and MLP too
        attn_out_norm, mlp_norm, mlp_out_norm = SANDWICH
    else:
        attn_out_norm, mlp_out_norm = None, None
        mlp_norm = next((n for n in MLP_NORMS if n in parts), None)
    unplaced = sorted(n for n, m in parts.items() if _is_norm(m) and n not in (attn_norm, mlp_norm, attn_out_norm,
                                                                              mlp_out_norm))
    if unplaced:  # a norm whose place is unknown: the partial-layer paths would compute another layer
        raise cannot(f"norms {', '.join(unplaced)} in {type(layer).__name__} are not where the standard layout puts "
                     "them (before / after attention and MLP)")

    names = {id(m): n for n, m in model.named_modules()}
    layout = LayerLayout(
        name=model_type,
        stack=names[id(stack)],
        layers=names[id(lists[0])],
        final_norm=names[id(norms[0])],
        lm_head=names[id(head)],
        attn=attn,
        attn_norm=attn_norm,
        mlp=mlp,
        mlp_norm=mlp_norm,
        kv_rope=_llama_attention(getattr(layer, attn), text),
        parallel=mlp_norm is None or bool(getattr(text, "use_parallel_residual", False)),
        attn_out_norm=attn_out_norm,
        mlp_out_norm=mlp_out_norm,
    )
    return replace(layout, **{k: v for k, v in IRREGULAR.get(model_type, {}).items() if k != "mlp"})


def _refusals(text, stack) -> list[tuple[str, bool]]:
    """Settings no layout check catches that would make the engine wrong: (why, whether this model has it)."""
    return [
        ("its layers normalise after attention (do_layer_norm_before=False, e.g. OPT-350m), and a skipped layer's "
         "K/V is written from the normed input", getattr(text, "do_layer_norm_before", True) is False),
        ("a projection sits between its final norm and the LM head (project_out: word_embed_proj_dim != "
         "hidden_size)", getattr(stack, "project_out", None) is not None),
    ]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _one(parts: dict[str, nn.Module], test) -> str | None:
    """The name of the one child passing ``test``; None when none or several do."""
    hits = [n for n, m in parts.items() if test(n, m)]
    return hits[0] if len(hits) == 1 else None


def _is_linear(module: nn.Module | None) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a peft LoRA layer wrapping one (its ``base_layer``)."""
    if hasattr(module, "base_layer"):
        module = module.base_layer
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _llama_attention(attn: nn.Module, text) -> bool:
    """True when a K/V-only write (hsd_exp.skip.partial) stores exactly what this attention would: separate
    q/k/v/o projections, a per-head ``head_dim``, RoPE over the whole head (``apply_rotary_pos_emb`` in its
    module), and no norm inside but Qwen3/Gemma-3's per-head ``q_norm`` / ``k_norm``. Anything else (fused QKV,
    partial rotary, learned positions) runs the attention block instead: slower, never wrong."""
    projections = all(_is_linear(getattr(attn, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    norms = {n for n, m in attn.named_children() if _is_norm(m)}
    rope = callable(getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None))
    return (projections and isinstance(getattr(attn, "head_dim", None), int) and hasattr(attn, "layer_idx")
            and rope and norms <= {"q_norm", "k_norm"} and _full_rotary(text))


def _full_rotary(text) -> bool:
    """RoPE rotates the whole head (no partial_rotary_factor < 1, at the top or per layer type)."""
    found = [getattr(text, "partial_rotary_factor", None), getattr(text, "rotary_pct", None)]
    params = getattr(text, "rope_parameters", None) or {}
    for value in (params, *params.values()):
        if isinstance(value, dict):
            found.append(value.get("partial_rotary_factor"))
    return all(f is None or f == 1.0 for f in found)


def mlp_of(layer: nn.Module, layout: LayerLayout):
    """The layer's MLP as one callable (OPT's is fc1, activation, fc2 applied in turn)."""
    if isinstance(layout.mlp, str):
        return getattr(layer, layout.mlp)
    parts = [getattr(layer, name) for name in layout.mlp]

    def mlp(x):
        for part in parts:
            x = part(x)
        return x

    return mlp


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (LoRA layers stay inside it)."""
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


def submodule(model: nn.Module, path: str) -> nn.Module:
    return unwrap(model).get_submodule(path)


def readout(model: nn.Module):
    """The final norm then the LM head, as a function of a hidden state: (..., C) -> (..., V). What an early exit
    (CALM's confidence, the early-exit loss) reads off an intermediate layer."""
    layout = layout_of(model)
    norm, head = submodule(model, layout.final_norm), submodule(model, layout.lm_head)
    return lambda h: head(norm(h))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return submodule(model, layout_of(model).layers)
