"""Hook sites: the ONLY place that spells TransformerLens hook names.

Everything else in lensattr names a hook site by the :class:`Site` enum (and a layer); the
adapter (:mod:`lensattr.models.adapter`) turns it into the bridge's hook point.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Site", "hook_name", "same_hook", "is_layer_site"]


class Site(str, Enum):
    """Hook sites lensattr uses. Layer-indexed sites take a layer; the others take none."""

    Z = "z"  # blocks.L.attn.hook_z            [batch, pos, head_index, d_head]
    PATTERN = "pattern"  # blocks.L.attn.hook_pattern  [batch, head_index, query_pos, key_pos]
    SCORES = "scores"  # blocks.L.attn.hook_attn_scores
    V = "v"  # blocks.L.attn.hook_v            [batch, pos, kv_head_index, d_head]
    RESID_PRE = "resid_pre"  # blocks.L.hook_resid_pre
    RESID_MID = "resid_mid"  # blocks.L.hook_resid_mid  (pre-norm: resid_pre + attention out)
    LN1_IN = "ln1_in"  # blocks.L.ln1.hook_in  (post-norm encoders: resid_pre + attention out)
    LN1_SCALE = "ln1_scale"  # blocks.L.ln1.hook_scale  [batch, pos, 1]
    BLOCK_OUT = "block_out"  # blocks.L.hook_out  [batch, pos, d_model]; the last one = final hidden
    RESID_FINAL = "resid_final"  # ln_final.hook_in   [batch, pos, d_model]
    LN_FINAL_SCALE = "ln_final_scale"  # ln_final.hook_scale
    LN_FINAL_OUT = "ln_final_out"  # ln_final.hook_out (the normalised final stream)
    EMBED = "embed"  # hook_embed  [batch, pos, d_model]: the token embedding on GPT-2 / Llama;
    #                    on BERT bridges the post-LayerNorm sum of word, position and token-type
    #                    embeddings (the same hook as embed_ln.hook_out)
    WORD_EMBED = "word_embed"  # embed.hook_out  [batch, pos, d_model]: the word (token)
    #                    embedding alone, on every family: on GPT-2 / Llama the same hook as
    #                    EMBED; on BERT positions and token types are added and the embedding
    #                    LayerNorm applied after it, as the model does
    POS_EMBED = "pos_embed"  # hook_pos_embed  [batch, pos, d_model]; fires only with learned
    #                                            absolute positions (GPT-2), not rotary
    MLP_OUT = "mlp_out"  # blocks.L.hook_mlp_out  [batch, pos, d_model], with its output bias
    K = "k"  # blocks.L.attn.hook_k  [batch, pos, kv_head_index, d_head], before rotary
    COS = "cos"  # blocks.L.attn.hook_cos  [1 or batch, pos, rotary_dim] (rotary models only)
    SIN = "sin"  # blocks.L.attn.hook_sin
    Q = "q"  # blocks.L.attn.hook_q  [batch, pos, head_index, d_head], before rotary


_LAYER_SITES = {
    Site.Z: "blocks.{layer}.attn.hook_z",
    Site.PATTERN: "blocks.{layer}.attn.hook_pattern",
    Site.SCORES: "blocks.{layer}.attn.hook_attn_scores",
    Site.V: "blocks.{layer}.attn.hook_v",
    Site.RESID_PRE: "blocks.{layer}.hook_resid_pre",
    Site.RESID_MID: "blocks.{layer}.hook_resid_mid",
    Site.LN1_IN: "blocks.{layer}.ln1.hook_in",
    Site.LN1_SCALE: "blocks.{layer}.ln1.hook_scale",
    Site.BLOCK_OUT: "blocks.{layer}.hook_out",
    Site.MLP_OUT: "blocks.{layer}.hook_mlp_out",
    Site.K: "blocks.{layer}.attn.hook_k",
    Site.COS: "blocks.{layer}.attn.hook_cos",
    Site.SIN: "blocks.{layer}.attn.hook_sin",
    Site.Q: "blocks.{layer}.attn.hook_q",
}
_GLOBAL_SITES = {
    Site.RESID_FINAL: "ln_final.hook_in",
    Site.LN_FINAL_SCALE: "ln_final.hook_scale",
    Site.LN_FINAL_OUT: "ln_final.hook_out",
    Site.EMBED: "hook_embed",
    Site.WORD_EMBED: "embed.hook_out",
    Site.POS_EMBED: "hook_pos_embed",
}



def hook_name(site: Site, layer: int | None = None) -> str:
    if site in _LAYER_SITES:
        if layer is None:
            raise ValueError(f"site {site.value!r} needs a layer")
        return _LAYER_SITES[site].format(layer=layer)
    return _GLOBAL_SITES[site]


def same_hook(model, a: Site, b: Site) -> bool:
    """Are two global sites one hook point on this bridge? (``Site.WORD_EMBED`` and
    ``Site.EMBED``: True on GPT-2 / Llama, False on BERT.)"""
    bridge = model if hasattr(model, "hook_dict") else model.model  # a bridge or an Adapter
    hooks = bridge.hook_dict
    first = hooks.get(hook_name(a))
    return first is not None and first is hooks.get(hook_name(b))


def is_layer_site(site: Site) -> bool:
    """Does this site take a layer (``blocks.L...``)?"""
    return site in _LAYER_SITES
