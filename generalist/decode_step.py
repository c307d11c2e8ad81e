"""A lean decoding forward for Llama-family backbones: the same arithmetic as the model's, fewer operators.

Why: a planner's forward is small (the Trajectory Transformer's 4 x 128 model over 128-256 beams), so its time
goes to the number of operators more than to their work. Through transformers' modules every layer runs three
projections for q, k and v, two for the MLP's gate and up, the rotary embedding twice, and a module call with its
hooks per sub-layer. Here q, k and v are one matrix product (their weights stacked once), gate and up another,
the rotary embedding is applied to the queries and keys together, and the layers are a plain loop: ~30 operators
per layer instead of ~60. ``Engine.feed`` uses it wherever it applies (:func:`supports`), else the model's own
forward; the logits are the same (``tests/test_engine.py`` compares them).

It reads the model's weights, never copies them, except the stacked projections, which are rebuilt whenever a
weight they come from changes (a ``to(dtype)``, a load, a training step: :meth:`DecodeStep.refresh`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from generalist.modeling_generalist import GeneralistForCausalLM
from generalist.shared_prefix import SHARED_PREFIX_ATTENTION

_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
ATTENTION = ("sdpa", SHARED_PREFIX_ATTENTION)  # the attention implementations whose masks this module builds


def supports(model: GeneralistForCausalLM) -> bool:
    """Whether :class:`DecodeStep` computes exactly what ``model`` does: a Llama backbone (``LlamaForCausalLM``:
    RMS norms, rotary embedding, gated MLP, a plain linear head) on sdpa or the shared-prefix attention."""
    text = model.config.text_config
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "model", None)
    if getattr(text, "model_type", None) != "llama" or body is None or not hasattr(body, "rotary_emb"):
        return False
    head = backbone.get_output_embeddings()
    return (text._attn_implementation in ATTENTION and isinstance(head, torch.nn.Linear)
            and not getattr(text, "final_logit_softcapping", None) and getattr(text, "logit_scale", None) in (None, 1.0)
            and all(hasattr(layer, part) for layer in body.layers for part in _LAYER_PARTS))


class DecodeStep:
    """``model``'s forward over new tokens with a KV cache, returning the last position's logits.

    Args:
        model: a model :func:`supports` accepts.
    """

    def __init__(self, model: GeneralistForCausalLM):
        if not supports(model):
            raise ValueError("DecodeStep needs a Llama backbone on sdpa or the shared-prefix attention")
        self.model = model
        self.body = model.backbone.model
        text = model.config.text_config
        self.act = ACT2FN[text.hidden_act]
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self._key: tuple | None = None
        self._qkv: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._gate_up: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def applies(self) -> bool:
        """Whether the model still runs an attention implementation this step builds masks for (``Engine.share``
        switches sdpa to the shared-prefix one; a user may switch it to anything)."""
        return self.model.config.text_config._attn_implementation in ATTENTION

    def refresh(self) -> None:
        """Stack q/k/v and gate/up weights again if any of them changed since the last call."""
        layers = self.body.layers
        parts = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                  layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in parts)
        if key == self._key:
            return
        self._qkv = [_stack([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                     for layer in layers]
        self._gate_up = [_stack([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in layers]
        self._key = key

    @torch.inference_mode()
    def __call__(self, *, input_ids: torch.Tensor, local_positions: torch.Tensor | None, patches: torch.Tensor | None,
                 patch_positions: torch.Tensor | None, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 cache: Cache, vocab_range: tuple[int, int] | None, **attention_kwargs) -> torch.Tensor:
        """Logits (B, V') of the last new position; ``attention_mask`` (B, Ls) 0/1 over the rows' own cached
        tokens and the new ones (``None``: all real), ``attention_kwargs`` go to the attention function as the
        model's forward passes them (``shared_prefix``, ``window_start``)."""
        self.refresh()
        model, body = self.model, self.body
        h = model.embed(input_ids, local_positions, patches, patch_positions)  # (B, Q, D)
        b, q = input_ids.shape
        cos, sin = body.rotary_emb(h, position_ids)  # (B, Q, hd)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, Q, 1, hd): one head axis for q and k together
        n_qk = (self.heads + self.kv_heads) * self.head_dim
        impl = model.config.text_config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS[impl]
        mask = None
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            w, bias = self._qkv[i]
            qkv = F.linear(x, w, bias)  # (B, Q, (H + 2 H_kv) hd)
            qk = qkv[..., :n_qk].view(b, q, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + _rotate_half(qk) * sin  # Su et al. 2021, as transformers' apply_rotary_pos_emb
            query = qk[:, :, : self.heads].transpose(1, 2)  # (B, H, Q, hd)
            key = qk[:, :, self.heads:].transpose(1, 2)  # (B, H_kv, Q, hd)
            value = qkv[..., n_qk:].view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            key, value = cache.update(key, value, i)  # (B, H_kv, Ls, hd)
            if i == 0:
                mask = _own_mask(attention_mask, q, key.shape[2])
            out, _ = attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling, **attention_kwargs)
            h = h + attn.o_proj(out.reshape(b, q, -1))  # (B, Q, D)
            x = layer.post_attention_layernorm(h)
            w, bias = self._gate_up[i]
            gate, up = F.linear(x, w, bias).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(self.act(gate) * up)
        h = body.norm(h[:, -1])  # (B, D): only the last position's logits are kept
        head = model.backbone.get_output_embeddings()
        if vocab_range is None:
            return F.linear(h, head.weight, head.bias)
        lo, hi = vocab_range
        return F.linear(h, head.weight[lo:hi], None if head.bias is None else head.bias[lo:hi])  # (B, hi - lo)


def _stack(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    if all(bias is None for bias in biases):
        return weight, None
    return weight, torch.cat([torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)
                              if m.bias is None else m.bias.detach() for m in linears])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _own_mask(attention_mask: torch.Tensor | None, q: int, length: int) -> torch.Tensor | None:
    """The bool mask (B or 1, 1, Q, Ls) the attention function gets, as transformers' ``create_causal_mask``
    builds it for sdpa: causal among the new tokens (the last Q of the Ls keys), padding masked; ``None`` when a
    single new token may read every key."""
    if attention_mask is None and q == 1:
        return None
    causal = torch.ones(q, length, dtype=torch.bool).tril(length - q)[None, None]  # (1, 1, Q, Ls)
    if attention_mask is None:
        return causal
    return causal & attention_mask[:, None, None, -length:].bool()


__all__ = ["DecodeStep", "supports"]
