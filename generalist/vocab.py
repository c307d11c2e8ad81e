"""The one place where token id ranges, special tokens and modalities are defined.

Layout (Gato, Reed et al. 2022, §2.1), disjoint and covering ``[0, vocab_size)``::

    [ text BPE | 1024 continuous bins | 1024 discrete values | special tokens ]
    0          T                      T+1024                 T+2048           vocab_size

The layout is saved with the tokenizer (``tokenizer_config.json``) and copied into the model config,
so a checkpoint can check that its tokenizer matches it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum

# mu-law companding constants (Gato §2.1): F(x) = sign(x) log(|x| mu + 1) / log(M mu + 1)
MU_LAW_MU = 100.0
MU_LAW_M = 256.0
NUM_CONTINUOUS_BINS = 1024
NUM_DISCRETE_VALUES = 1024

# Image patches (Gato §2.2): 16x16 patches, pixels scaled to [-1, 1] then divided by sqrt(patch size).
PATCH_SIZE = 16
DEFAULT_IMAGE_SIZE = 64  # images are fitted into a DEFAULT_IMAGE_SIZE^2 box -> (64/16)^2 = 16 patches
IMAGE_CHANNELS = 3

# Special tokens, in id order after the discrete range.
PAD = "<pad>"
BOS = "<bos>"  # start of an episode / sample
EOS = "<eos>"  # end of an episode / sample (a finished caption or text ends here)
SEP = "<sep>"  # between an observation and its action
IMAGE = "<image>"  # placeholder for one image patch; its embedding is computed from the pixels
NO_RETURN = "<no_return>"  # "unconditioned": stands where the return-to-go would be (Gato mode)
# an action the model is not shown (the policy view, docs/token_layout.md): fed in place of past actions
# so that a policy must read the states, not copy its previous action. Appended last: layouts saved
# before it existed are a prefix of this one, and their ids are unchanged.
HIDDEN_ACTION = "<hidden_action>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SEP, IMAGE, NO_RETURN, HIDDEN_ACTION)


class Modality(IntEnum):
    """What a token is; the model weights its loss by the modality of the *target* token."""

    PAD = 0
    SPECIAL = 1  # structural tokens (<bos>, <sep>, <no_return>): predictable, never trained on
    TEXT = 2
    CAPTION = 3
    IMAGE = 4  # image placeholders: inputs only, never a target
    OBSERVATION = 5
    ACTION = 6
    REWARD = 7
    RETURN = 8
    VALUE = 9  # a <no_return> position's label: the discounted return-to-go (or <eos>), predicted only


MODALITY_NAMES: tuple[str, ...] = tuple(m.name.lower() for m in Modality)
# what a loss can be reported for: padding, structural tokens and image placeholders are never targets
LOSS_MODALITIES: tuple[str, ...] = tuple(m for m in MODALITY_NAMES if m not in ("pad", "special", "image"))

# Default loss weight per modality: text, actions, rewards and returns always; observations too
# (the Trajectory Transformer mode needs a world model), less strongly. Never padding or placeholders.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "pad": 0.0,
    "special": 0.0,
    "text": 1.0,
    "caption": 1.0,
    "image": 0.0,
    "observation": 0.5,
    "action": 1.0,
    "reward": 1.0,
    "return": 1.0,
    "value": 1.0,
}


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of every token kind. ``text_size`` comes from the trained BPE."""

    text_size: int
    num_continuous: int = NUM_CONTINUOUS_BINS
    num_discrete: int = NUM_DISCRETE_VALUES
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS

    def __post_init__(self):
        for name in ("text_size", "num_continuous", "num_discrete"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VocabLayout.{name} must be positive, got {getattr(self, name)}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special tokens must be unique, got {self.special_tokens}")
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    @property
    def continuous_offset(self) -> int:
        return self.text_size

    @property
    def discrete_offset(self) -> int:
        return self.text_size + self.num_continuous

    @property
    def special_offset(self) -> int:
        return self.discrete_offset + self.num_discrete

    @property
    def vocab_size(self) -> int:
        return self.special_offset + len(self.special_tokens)

    def special_id(self, token: str) -> int:
        try:
            return self.special_offset + self.special_tokens.index(token)
        except ValueError:
            raise KeyError(f"unknown special token {token!r}; known: {self.special_tokens}") from None

    @property
    def ranges(self) -> dict[str, range]:
        """Half-open id range of each token kind, in vocabulary order."""
        return {
            "text": range(0, self.continuous_offset),
            "continuous": range(self.continuous_offset, self.discrete_offset),
            "discrete": range(self.discrete_offset, self.special_offset),
            "special": range(self.special_offset, self.vocab_size),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VocabLayout:
        return cls(**{**d, "special_tokens": tuple(d.get("special_tokens", SPECIAL_TOKENS))})
