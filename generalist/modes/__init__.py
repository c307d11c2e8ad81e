"""Decoding modes over the one :class:`~generalist.engine.Engine`.

Control modes are small strategies behind one protocol (:class:`ControlMode`), driven by
:class:`~generalist.Agent`; captioning and text are plain functions.

=============  ==============================================================================
mode           entry points
=============  ==============================================================================
Gato           :class:`GatoMode`, :func:`demonstration_prompt` (Reed et al. 2022)
DT             :class:`DTMode`, :func:`sample_expert_returns` (Chen et al. 2021; Lee et al. 2022)
TT             :class:`TTMode`, :func:`tt_plan`, :class:`TTConfig` (Janner et al. 2021)
captioning     :func:`caption`, :func:`beam_search`
text           :func:`generate_text`
=============  ==============================================================================
"""

from generalist.modes.caption import beam_search, caption
from generalist.modes.control import ControlMode, ControlStep, decode_actions, reward_sample, step_prompts
from generalist.modes.dt import DTMode, initial_return, sample_expert_returns
from generalist.modes.gato import GatoMode, demonstration_prompt
from generalist.modes.text import generate_text
from generalist.modes.tt import TT_PRESETS, Plan, TTConfig, TTMode, tt_plan, tt_preset

__all__ = [
    "TT_PRESETS",
    "ControlMode",
    "ControlStep",
    "DTMode",
    "GatoMode",
    "Plan",
    "TTConfig",
    "TTMode",
    "beam_search",
    "caption",
    "decode_actions",
    "demonstration_prompt",
    "generate_text",
    "initial_return",
    "reward_sample",
    "sample_expert_returns",
    "step_prompts",
    "tt_plan",
    "tt_preset",
]
