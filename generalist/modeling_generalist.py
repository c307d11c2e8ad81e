"""`GeneralistForCausalLM`: any 🤗 causal LM backbone fed with Gato-style multi-modal embeddings.

::

    input_ids ──embed──┐                                   (B, T, D)
    local_positions ───+──► inputs_embeds ──► backbone ──► logits (B, T, V) ──► weighted loss
    patches ──ResNet block + row/col──► scattered at <image> tokens

Attention, caching and the LM head are the backbone's own: the wrapper never re-implements them,
so it keeps the backbone's speed and its KV cache (``past_key_values`` / ``use_cache``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from generalist import integrity
from generalist.configuration_generalist import GeneralistConfig
from generalist.vocab import MODALITY_NAMES, Modality

GROUP_NORM_GROUPS = 8


@dataclass
class GeneralistCausalLMOutput(ModelOutput):
    """Output of :class:`GeneralistForCausalLM`.

    Attributes:
        loss: weighted mean next-token loss (scalar) when ``labels`` are given.
        logits: (B, T, V) next-token logits (only the last ``logits_to_keep`` positions if set).
        cache: the backbone's KV cache, to feed back with the next tokens (``past_key_values`` in
            transformers < 5.24; that name still reads it).
        modality_losses: unweighted mean loss per target modality present in the batch (for logging).
        modality_counts: number of target tokens per modality in the batch.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    modality_losses: dict[str, torch.Tensor] | None = None
    modality_counts: dict[str, torch.Tensor] | None = None


class PatchResidualBlock(nn.Module):
    """Pre-activation ResNet v2 block (He et al. 2016) with GroupNorm, as Gato §2.2 uses for patches."""

    def __init__(self, channels: int):
        super().__init__()
        groups = min(GROUP_NORM_GROUPS, channels)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, P, P)
        h = self.conv1(F.gelu(self.norm1(x)))
        h = self.conv2(F.gelu(self.norm2(h)))
        return x + h


class PatchEncoder(nn.Module):
    """Flat normalised patches (N, C*P*P) + (row, col) -> embeddings (N, D) (Gato §2.2).

    A strided convolution first folds each 16x16 patch into a (P/s)x(P/s) grid of W-channel cells
    (s = ``patch_encoder_stride``), then one ResNet v2 block mixes them and a linear layer maps the
    whole patch to the model width. Running the block on the folded grid instead of all 16x16 pixels
    costs about 10x less (measured: 0.07 s vs 0.73 s for the ~1200 patches of a demo batch) while
    the linear projection still sees every cell of the patch.
    """

    def __init__(self, config: GeneralistConfig, hidden_size: int):
        super().__init__()
        self.channels, self.patch_size = config.image_channels, config.patch_size
        width, stride = config.patch_encoder_channels, config.patch_encoder_stride
        self.stem = nn.Conv2d(self.channels, width, stride, stride=stride)
        self.block = PatchResidualBlock(width)
        self.proj = nn.Linear(width * (self.patch_size // stride) ** 2, hidden_size)
        grid = config.image_size // config.patch_size
        self.row_embed = nn.Embedding(grid, hidden_size)
        self.col_embed = nn.Embedding(grid, hidden_size)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = patches.view(-1, self.channels, self.patch_size, self.patch_size)  # (N, C, P, P)
        x = self.block(self.stem(x))  # (N, W, P/s, P/s)
        x = self.proj(x.flatten(1))  # (N, D)
        return x + self.row_embed(positions[:, 0]) + self.col_embed(positions[:, 1])


class ValueEmbedding(nn.Module):
    """Where a continuous token's bin lies on the mu-law axis, embedded (see ``GeneralistConfig.value_features``).

    ``c = (bin + 0.5) / (bins / 2) - 1`` in (-1, 1), monotone in the value; features ``[c, sin(2^k π c),
    cos(2^k π c)]`` (k < K, Fourier features as in Tancik et al. 2020) go through one linear layer, so
    neighbouring bins start with neighbouring embeddings and the sign of a value is one direction.
    Tokens outside the continuous range get zero. Without per-bin rows (``bin_embeddings=False``) the
    map has a bias: the offset that marks a token as a value.
    """

    def __init__(self, config: GeneralistConfig, hidden: int):
        super().__init__()
        span = config.layout.ranges["continuous"]
        self.start, self.bins = span.start, span.stop - span.start
        self.proj = nn.Linear(1 + 2 * config.value_features, hidden, bias=not config.bin_embeddings)

    def inside(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: which tokens are continuous values."""
        return (input_ids >= self.start) & (input_ids < self.start + self.bins)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        index = input_ids - self.start  # (B, T)
        inside = self.inside(input_ids)
        c = ((index.clamp(0, self.bins - 1) + 0.5) / (self.bins / 2) - 1.0).to(self.proj.weight.dtype)
        angles = c[..., None] * torch.pi * 2.0 ** torch.arange(
            (self.proj.in_features - 1) // 2, device=c.device, dtype=c.dtype)  # (B, T, K)
        features = torch.cat([c[..., None], angles.sin(), angles.cos()], -1)  # (B, T, 1 + 2K)
        return self.proj(features) * inside[..., None]  # (B, T, D)


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy of next-token prediction and its weighted mean.

    logits (B, T, V) at position t predict labels[t + 1]; ``weights`` (B, T) belong to the *targets*.
    Returns the per-target loss (B, T-1) and sum(w * loss) / sum(w) (0 when all weights are 0).
    The targets are shifted instead of the logits, so the (B*T, V) logits are used without a copy.
    """
    b, t, v = logits.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the last position has no target
    w = F.pad(weights[:, 1:], (0, 1)) * (targets != -100)
    token_loss = F.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(-1), reduction="none",
                                 ignore_index=-100).view(b, t)
    loss = (token_loss * w).sum() / w.sum().clamp_min(1e-8)
    return token_loss[:, :-1], loss


class GeneralistPreTrainedModel(PreTrainedModel):
    config_class = GeneralistConfig
    config: GeneralistConfig
    base_model_prefix = "generalist"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class GeneralistForCausalLM(GeneralistPreTrainedModel, GenerationMixin):
    """One causal LM over text, image patches, discrete and continuous values (Reed et al. 2022).

    Inputs are the keys of :meth:`GeneralistTokenizer.collate`: ``input_ids``, ``attention_mask``,
    ``modality_ids``, ``local_positions``, ``patches``, ``patch_positions`` and ``labels``.
    """

    def __init__(self, config: GeneralistConfig):
        super().__init__(config)
        self.backbone = AutoModelForCausalLM.from_config(config.text_config)
        hidden = config.text_config.hidden_size
        self.patch_encoder = PatchEncoder(config, hidden)
        # index 0 = "not inside an observation" and stays a zero vector
        self.local_position_embed = nn.Embedding(config.max_local_positions + 1, hidden, padding_idx=0)
        if config.value_features:
            self.value_embed = ValueEmbedding(config, hidden)
        # A plain tuple, not a buffer: transformers v5's from_pretrained leaves non-persistent buffers
        # uninitialised (a loaded model's loss came out as -3e26), and a persistent one would be a weight.
        self.loss_weight_table = tuple(float(config.loss_weights[name]) for name in MODALITY_NAMES)
        self._no_split_modules = getattr(self.backbone, "_no_split_modules", None)
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the weight files' sizes and sha256 in ``manifest.json``
        (:mod:`generalist.integrity`), so that a damaged file is named on load instead of loading garbage."""
        super().save_pretrained(save_directory, *args, **kwargs)
        d = Path(save_directory)
        integrity.write_manifest(d, [p.relative_to(d) for p in d.iterdir() if _is_weight_file(p.name)])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load as transformers does; a truncated or corrupted weight file is an ``OSError`` naming it.

        Only the weight files of the manifest are checked: a training checkpoint's manifest also lists
        its optimizer state, which loading the model never reads.
        """
        d = Path(pretrained_model_name_or_path)
        if d.is_dir() and (problem := integrity.verify(d, include=_is_weight_file)) is not None:
            raise OSError(problem)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as e:
            raise OSError(f"{pretrained_model_name_or_path}: a model.safetensors file is truncated or corrupted "
                          f"({e})") from e

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def embed(self, input_ids: torch.Tensor, local_positions: torch.Tensor | None = None,
              patches: torch.Tensor | None = None, patch_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with patch embeddings at ``<image>`` tokens plus local positions (B, T, D)."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        n_image = int(image_mask.sum())
        n_patches = 0 if patches is None else patches.shape[0]
        if n_image != n_patches:
            raise ValueError(f"{n_image} <image> tokens but {n_patches} patches were given")
        if n_image:
            patch_embeds = self.patch_encoder(patches.to(embeds.dtype), patch_positions)  # (P, D)
            embeds = embeds.masked_scatter(image_mask[..., None], patch_embeds.to(embeds.dtype))
        return self._add_values_and_places(embeds, input_ids, local_positions)

    def embed_tokens(self, input_ids: torch.Tensor, local_positions: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`embed` of tokens that hold no ``<image>`` (B, T, D): no data-dependent check (and
        :meth:`embedding_tables` gives the same as two lookup tables)."""
        return self._add_values_and_places(self.get_input_embeddings()(input_ids), input_ids, local_positions)

    @torch.no_grad()
    def embedding_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`embed_tokens` adds up, as two lookup tables ``(tokens, places)``: ``embed_tokens(ids, local)``
        equals ``tokens[ids] + places[local.clamp(max=config.max_local_positions)]``. ``tokens`` (V, D): each id's
        embedding with its value's place on the mu-law axis; ``places`` (max_local_positions + 1, D): the local
        position embeddings (row 0, outside an observation, is zero). For a decoder whose compiled forward takes
        every weight as an input (:mod:`generalist.static_beams`): a lookup, no module or config to trace."""
        ids = torch.arange(self.get_input_embeddings().weight.shape[0], device=self.device)[None]
        return self.embed_tokens(ids)[0], self.local_position_embed.weight

    def _add_values_and_places(self, embeds: torch.Tensor, input_ids: torch.Tensor,
                               local_positions: torch.Tensor | None) -> torch.Tensor:
        """A value's place on the mu-law axis and each token's place in its observation, added to ``embeds``."""
        if self.config.value_features:
            if not self.config.bin_embeddings:  # a value is embedded by where it lies, not by a row of its own
                embeds = embeds.masked_fill(self.value_embed.inside(input_ids)[..., None], 0.0)
            embeds = embeds + self.value_embed(input_ids).to(embeds.dtype)
        if local_positions is not None:
            local = local_positions.clamp(max=self.config.max_local_positions)
            embeds = embeds + self.local_position_embed(local)
        return embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        local_positions: torch.LongTensor | None = None,
        patches: torch.FloatTensor | None = None,
        patch_positions: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vocab_range: tuple[int, int] | None = None,
        **kwargs,
    ) -> GeneralistCausalLMOutput:
        """The backbone's forward on Gato-style embeddings, plus the weighted loss when ``labels`` are given.

        ``vocab_range=(lo, hi)`` computes logits only for ids ``[lo, hi)``: (B, T, hi - lo), equal to
        ``logits[..., lo:hi]`` of the full forward. Decoding that constrains the next token to a
        known id range (continuous bins, an action's values) skips the rest of the LM head, which
        at small widths costs as much as the whole transformer (128 x 4102 MACs per token).
        """
        if cache is None:  # the pre-5.24 name of the cache argument
            cache = kwargs.pop("past_key_values", None)
        if labels is not None and use_cache is None:
            use_cache = False  # a loss forward is never continued
        if position_ids is not None and cache is None and not use_cache and attention_mask is not None \
                and bool(attention_mask.all()):
            # position ids that restart at 0 mark packed documents (PackingConfig.dt_window_steps), which the
            # backbone keeps apart (a block-diagonal causal mask) only when given no mask and no cache
            attention_mask = None
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, local_positions, patches, patch_positions)
        if vocab_range is not None:
            if labels is not None:
                raise ValueError("vocab_range computes partial logits; it cannot be combined with labels")
            return self._forward_vocab_range(inputs_embeds, attention_mask, position_ids, cache, use_cache,
                                             logits_to_keep, vocab_range, **kwargs)
        out = self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = modality_losses = modality_counts = None
        if labels is not None:
            if modality_ids is None:
                weights = torch.ones_like(labels, dtype=out.logits.dtype)
                modality_ids = torch.full_like(labels, int(Modality.TEXT))
            else:
                table = torch.tensor(self.loss_weight_table, dtype=out.logits.dtype, device=out.logits.device)
                weights = table[modality_ids]  # (B, T)
            token_loss, loss = weighted_token_loss(out.logits, labels, weights)
            modality_losses, modality_counts = _per_modality(token_loss.detach(), labels[:, 1:], modality_ids[:, 1:])
        return GeneralistCausalLMOutput(
            loss=loss, logits=out.logits, cache=out.cache,
            hidden_states=out.hidden_states, attentions=out.attentions,
            modality_losses=modality_losses, modality_counts=modality_counts,
        )

    def _forward_vocab_range(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                             vocab_range: tuple[int, int], **kwargs) -> GeneralistCausalLMOutput:
        lo, hi = (int(v) for v in vocab_range)
        if not 0 <= lo < hi <= self.config.vocab_size:
            raise ValueError(f"vocab_range [{lo}, {hi}) is empty or outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        head = self.backbone.get_output_embeddings()
        text = self.config.text_config
        plain_head = (isinstance(head, nn.Linear) and not getattr(text, "final_logit_softcapping", None)
                      and getattr(text, "logit_scale", None) in (None, 1.0)
                      and hasattr(self.backbone, "base_model"))
        if not plain_head:  # a head with extras (soft-capping, scaling...): the backbone's own, then slice
            out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
            logits = out.logits[..., lo:hi]
        else:  # the backbone's body, then only the head rows [lo, hi)
            out = self.backbone.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                           position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
            hidden = out.last_hidden_state
            if isinstance(logits_to_keep, int):
                hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            else:
                hidden = hidden[:, logits_to_keep]
            bias = None if head.bias is None else head.bias[lo:hi]
            logits = F.linear(hidden, head.weight[lo:hi], bias)
        return GeneralistCausalLMOutput(logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                        attentions=out.attentions)

    def prepare_inputs_for_generation(self, input_ids, cache=None, patches=None,
                                      patch_positions=None, local_positions=None, **kwargs):
        """For ``generate``: patches and local positions only go in with the prefill."""
        inputs = self.backbone.prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        prefill = cache is None or cache.get_seq_length() == 0
        n = inputs["input_ids"].shape[1] if inputs.get("input_ids") is not None else 0
        inputs["input_ids"] = input_ids[:, -n:] if n else input_ids
        if prefill:
            inputs.update(patches=patches, patch_positions=patch_positions, local_positions=local_positions)
        return inputs


def _per_modality(token_loss: torch.Tensor, targets: torch.Tensor, modality: torch.Tensor
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean unweighted loss and count of target tokens per modality (only modalities present).

    One scatter-add over all tokens and a single host sync, instead of one masked mean per modality.
    """
    valid = (targets != -100).reshape(-1)
    mod = modality.reshape(-1)[valid]
    sums = torch.zeros(len(Modality), dtype=token_loss.dtype, device=token_loss.device)
    sums.index_add_(0, mod, token_loss.reshape(-1)[valid])
    counts = torch.bincount(mod, minlength=len(Modality))
    losses, out_counts = {}, {}
    for m, n in zip(Modality, counts.tolist(), strict=True):
        if n and m not in (Modality.PAD, Modality.IMAGE):
            losses[m.name.lower()] = sums[m] / n
            out_counts[m.name.lower()] = counts[m]
    return losses, out_counts


def _is_weight_file(name: str) -> bool:
    """Files ``save_pretrained`` writes weights to: ``model.safetensors``, its shards and their index."""
    return "/" not in name and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))
