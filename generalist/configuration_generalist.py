"""`GeneralistConfig`: the backbone's config plus what the multi-modal wrapper adds."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from generalist.vocab import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LOSS_WEIGHTS,
    HIDDEN_ACTION,
    IMAGE,
    IMAGE_CHANNELS,
    MODALITY_NAMES,
    PAD,
    PATCH_SIZE,
    VocabLayout,
)

DEFAULT_TEXT_VOCAB = 2048  # the size of the packaged default tokenizer's BPE

# A tiny Llama-style backbone that trains on a laptop CPU (about 3.5M parameters with our vocabulary).
TINY_LLAMA = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


class GeneralistConfig(PreTrainedConfig):
    r"""Configuration of :class:`~generalist.GeneralistForCausalLM`.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The backbone: any 🤗 transformers causal LM config (rebuilt from a dict by its
            ``model_type``; a tiny Llama by default). Its ``vocab_size`` is overwritten by the
            vocabulary layout's.
        vocab_layout (`dict`, *optional*):
            :class:`~generalist.vocab.VocabLayout` as a dict (``text_size`` etc.), copied from the
            tokenizer so that a checkpoint can refuse a tokenizer that does not match it.
        image_size (`int`): side of the square box images are fitted into (multiple of ``patch_size``).
        patch_size (`int`): side of an image patch (16 in Gato).
        image_channels (`int`): channels of a patch (RGB).
        patch_encoder_channels (`int`): width of the ResNet block that embeds each patch (Gato §2.2).
        patch_encoder_stride (`int`): the patch is folded into (patch_size / stride)^2 cells by a strided
            convolution before the ResNet block (must divide ``patch_size``).
        max_local_positions (`int`): most tokens in one observation that get a local position embedding.
        loss_weights (`dict[str, float]`, *optional*): loss weight per modality
            (``pad, special, text, caption, image, observation, action, reward, return``).
        initializer_range (`float`): std of the normal init of the wrapper's own weights.
        context_length (`int`, *optional*): tokens per sequence the model was *trained* on. Agents,
            evaluation and every decoding mode use it as their context by default, so a model is never
            asked to attend further back than it learned to (default: the backbone's
            ``max_position_embeddings``).
        dt_context_steps (`int`, *optional*): the steps of the windows return-conditioned sequences were
            trained on (``PackingConfig.dt_window_steps``): Decision Transformer mode attends to as many by
            default (``DTMode.context_steps``), as it acts in the context it learned. ``None``: whole episodes.
        prompt_length (`int`, *optional*): most tokens of a Gato demonstration prompt in training;
            evaluation draws prompts of the same size.
        value_features (`int`): a continuous token's embedding also gets a learned linear map of its
            bin's position on the mu-law axis, ``c`` in (-1, 1), and of ``sin / cos(2^k π c)`` for
            ``k < value_features`` (0: off, pure Gato token embeddings). Why: a per-bin embedding knows
            nothing of order, so a policy that turns on the *sign* of a small value (Pendulum's
            velocity at a swing's turn, spread over ~240 rarely seen bins near 0) must learn every bin
            on its own; JAT embeds continuous observations linearly for the same reason.
        bin_embeddings (`bool`): continuous tokens also get their bin's own row of the input embedding
            table (Gato's lookup). ``False`` (needs ``value_features``): a continuous input is embedded
            only by the value features (plus a learned offset), so the embedding is a smooth function of
            the value. Why: a row per bin is learnt only from the steps that visit that bin, so rare bins
            keep near-random rows; in a small stand-in (``bench/embedding_proxy.py``) that kept a
            Pendulum clone at random level. Not measured in this model yet (docs/token_layout.md).
            Outputs keep one logit per bin either way.
        hidden_action_prob (`float`): share of the training control sequences whose action inputs were
            ``<hidden_action>`` (:attr:`generalist.packing.PackingConfig.hidden_action_prob`). Above 0,
            Gato and DT modes feed ``<hidden_action>`` for every action they take (the policy view they
            were trained for); TT feeds the real actions its world model needs.
    """

    model_type = "generalist"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=TINY_LLAMA),
    }

    text_config: dict | PreTrainedConfig | None = None
    vocab_layout: dict | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    image_channels: int = IMAGE_CHANNELS
    patch_encoder_channels: int = 64
    patch_encoder_stride: int = 4
    max_local_positions: int = 512
    loss_weights: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    context_length: int | None = None
    prompt_length: int | None = None
    dt_context_steps: int | None = None
    value_features: int = 0
    bin_embeddings: bool = True
    hidden_action_prob: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layout = VocabLayout.from_dict(self.vocab_layout) if self.vocab_layout else VocabLayout(DEFAULT_TEXT_VOCAB)
        self.vocab_layout = layout.to_dict()
        self.text_config.vocab_size = layout.vocab_size
        self.text_config.pad_token_id = layout.special_id(PAD)
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for name, w in (self.loss_weights or {}).items():
            if name not in MODALITY_NAMES:
                raise ValueError(f"loss_weights: unknown modality {name!r}; expected one of {MODALITY_NAMES}")
            if not w >= 0:
                raise ValueError(f"loss_weights[{name!r}] must be >= 0, got {w!r}")
            weights[name] = float(w)
        self.loss_weights = weights
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.patch_encoder_stride <= 0 or self.patch_size % self.patch_encoder_stride:
            raise ValueError(f"patch_encoder_stride ({self.patch_encoder_stride}) must divide patch_size "
                             f"({self.patch_size})")
        max_positions = getattr(self.text_config, "max_position_embeddings", None)
        if self.context_length is None:
            self.context_length = max_positions or 2048
        if self.context_length <= 0 or (max_positions and self.context_length > max_positions):
            raise ValueError(f"context_length must be in [1, max_position_embeddings={max_positions}], "
                             f"got {self.context_length}")
        if self.prompt_length is None:
            self.prompt_length = self.context_length // 4
        if self.dt_context_steps is not None and self.dt_context_steps < 1:
            raise ValueError(f"dt_context_steps must be at least 1 (None: whole episodes), got {self.dt_context_steps}")
        if not self.bin_embeddings and not self.value_features:
            raise ValueError("bin_embeddings=False needs value_features > 0: continuous inputs would have no embedding")
        if not 0.0 <= self.hidden_action_prob <= 1.0:
            raise ValueError(f"hidden_action_prob must be in [0, 1], got {self.hidden_action_prob}")
        if self.hidden_action_prob and HIDDEN_ACTION not in layout.special_tokens:
            raise ValueError(f"hidden_action_prob={self.hidden_action_prob} needs {HIDDEN_ACTION} in the vocabulary "
                             f"layout; it has {layout.special_tokens}")
        for name in ("patch_size", "patch_encoder_channels", "max_local_positions", "prompt_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.from_dict(self.vocab_layout)

    @property
    def image_token_id(self) -> int:
        return self.layout.special_id(IMAGE)

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size
