"""generalist: one transformer that reads and writes every modality."""

from transformers import AutoConfig, AutoModelForCausalLM

from generalist.agent import Agent
from generalist.configuration_generalist import GeneralistConfig
from generalist.engine import Engine
from generalist.modeling_generalist import GeneralistCausalLMOutput, GeneralistForCausalLM
from generalist.task_spec import FieldSpec, TaskSpec, UnsupportedSpaceError
from generalist.tokenizer import GeneralistTokenizer, TokenizationError
from generalist.vocab import Modality, VocabLayout

AutoConfig.register(GeneralistConfig.model_type, GeneralistConfig)
AutoModelForCausalLM.register(GeneralistConfig, GeneralistForCausalLM)

__all__ = [
    "Agent",
    "Engine",
    "FieldSpec",
    "GeneralistCausalLMOutput",
    "GeneralistConfig",
    "GeneralistForCausalLM",
    "GeneralistTokenizer",
    "Modality",
    "TaskSpec",
    "TokenizationError",
    "UnsupportedSpaceError",
    "VocabLayout",
]
