"""Decoding modes: each a small function over the one :class:`~generalist.engine.Engine`.

=============  ==============================================================================
mode           entry points
=============  ==============================================================================
Gato           :func:`demonstration_prompt`, :func:`gato_act` (Reed et al. 2022)
DT             :func:`dt_act`, :func:`next_returns_to_go`, :func:`sample_expert_returns`
               (Chen et al. 2021; Lee et al. 2022)
TT             :func:`tt_plan`, :class:`TTConfig` (Janner et al. 2021)
captioning     :func:`caption`, :func:`beam_search`
text           :func:`generate_text`
=============  ==============================================================================
"""

from generalist.modes.caption import beam_search, caption
from generalist.modes.control import decode_actions, reward_sample, step_prompts
from generalist.modes.dt import dt_act, initial_return, next_returns_to_go, sample_expert_returns
from generalist.modes.gato import demonstration_prompt, gato_act
from generalist.modes.text import generate_text
from generalist.modes.tt import TT_PRESETS, Plan, TTConfig, tt_plan

__all__ = [
    "TT_PRESETS",
    "Plan",
    "TTConfig",
    "beam_search",
    "caption",
    "decode_actions",
    "demonstration_prompt",
    "dt_act",
    "gato_act",
    "generate_text",
    "initial_return",
    "next_returns_to_go",
    "reward_sample",
    "sample_expert_returns",
    "step_prompts",
    "tt_plan",
]
