"""The one table of architecture differences.

Every supported decoder layer has the shape ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))`` with
RMSNorm; what differs is which linear projections exist, which of them share an input, and which
matrix defines the rotation of the transform (and carries the weight-informed score in the
reproduction default). Everything else in the package reads this table instead of branching on
the architecture.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Adapter:
    model_type: str
    attn_inputs: tuple[str, ...]      # projections reading the attention block's input, in order
    attn_output: str                  # projection reading the attention output
    mlp_inputs: tuple[str, ...]       # projections reading the MLP block's input
    mlp_output: str                   # projection reading the activated MLP hidden state
    attn_key: str                     # SVD of this one sets the attention-block rotation
    mlp_key: str                      # SVD of this one sets the MLP-block rotation
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"

    @property
    def projections(self) -> tuple[str, ...]:
        """All sparsified projections of a layer, in forward order."""
        return (*self.attn_inputs, self.attn_output, *self.mlp_inputs, self.mlp_output)

    @property
    def weighted_default(self) -> tuple[str, ...]:
        """Projections scored with |x|*colnorm in the reproduction default (the official code's rule)."""
        return (self.attn_key, self.mlp_key)

    def module_of(self, proj: str) -> str:
        """Sub-module of the decoder layer that owns a projection ("self_attn" or "mlp")."""
        return self.attn if proj in (*self.attn_inputs, self.attn_output) else self.mlp


_LLAMA_LIKE = dict(attn_inputs=("q_proj", "k_proj", "v_proj"), attn_output="o_proj",
                   mlp_inputs=("gate_proj", "up_proj"), mlp_output="down_proj",
                   attn_key="k_proj", mlp_key="gate_proj")

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA_LIKE),        # Llama-2, Llama-3, SmolLM2
    "mistral": Adapter("mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),        # q/k/v carry biases; nothing else differs
    "phi3": Adapter("phi3", attn_inputs=("qkv_proj",), attn_output="o_proj",
                    mlp_inputs=("gate_up_proj",), mlp_output="down_proj",
                    attn_key="qkv_proj", mlp_key="gate_up_proj"),   # Phi-3, Phi-4: fused
}

SUPPORTED = tuple(ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")
    return ADAPTERS[model_type]


def get_submodule(root, dotted: str):
    return root.get_submodule(dotted)


def decoder_layers(model, adapter: Adapter | None = None):
    adapter = adapter or adapter_for(model)
    return model.get_submodule(adapter.layers)


def projection(model, layer: int, proj: str, adapter: Adapter | None = None):
    """The nn.Linear of projection ``proj`` in decoder layer ``layer``."""
    adapter = adapter or adapter_for(model)
    block = decoder_layers(model, adapter)[layer]
    return block.get_submodule(f"{adapter.module_of(proj)}.{proj}")


def iter_projections(model, adapter: Adapter | None = None):
    """Yield (layer index, projection name, nn.Linear) over the whole model."""
    adapter = adapter or adapter_for(model)
    for i, _ in enumerate(decoder_layers(model, adapter)):
        for p in adapter.projections:
            yield i, p, projection(model, i, p, adapter)


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of one layer, from a config alone."""
    a = adapter_for(config)
    d = config.hidden_size
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    ff = config.intermediate_size
    q, kv = n_heads * head_dim, n_kv * head_dim
    if a.model_type == "phi3":
        return {"qkv_proj": (q + 2 * kv, d), "o_proj": (d, q),
                "gate_up_proj": (2 * ff, d), "down_proj": (d, ff)}
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}


# --- a model's identity (plans check it) -------------------------------------------------------
_HASH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias")


def config_hash(config) -> str:
    """sha256 (16 hex) of the fields that define a model's computation (not its dtype or ties)."""
    d = {}
    for k in _HASH_FIELDS:
        v = getattr(config, k, None)
        if v is not None:
            d[k] = v
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weight_fingerprint(model) -> list[float]:
    """Column norms of the MLP's output projection: 16 of the first layer's, then 4 of every layer's
    (so a model whose MLP changed in any layer, a fine-tune, is told apart). The transform leaves them
    alone (only that projection's output side is rotated). Plans made before the per-layer norms
    hold the first 16 only, and are checked on those."""
    import torch
    a = adapter_for(model)
    n_layers = len(decoder_layers(model))
    first = projection(model, 0, a.mlp_output, a).weight.detach()
    norms = [first[:, :16].float().norm(dim=0)]
    norms += [projection(model, i, a.mlp_output, a).weight.detach()[:, :4].float().norm(dim=0) for i in range(n_layers)]
    return [float(v) for v in torch.cat([t.cpu() for t in norms])]
