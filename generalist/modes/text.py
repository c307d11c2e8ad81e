"""Text generation: prompt in, text out until ``<eos>`` (only text ids and ``<eos>`` can be drawn)."""

from __future__ import annotations

from collections.abc import Sequence

from generalist.engine import Engine
from generalist.modes.caption import beam_search, text_allowed
from generalist.tokenizer import GeneralistTokenizer, slice_sample


def generate_text(engine: Engine, tok: GeneralistTokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  beam_width: int = 1) -> list[str]:
    """Continue each prompt -> the generated continuations (prompts not included).

    Example: ``generate_text(Engine(model, seed=0), tok, "Once upon", temperature=0.8, top_k=40)``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    # "<bos> text <eos>" without its <eos>: the model continues the text
    samples = [slice_sample(tok.encode_text_sample(p), 0, -1) for p in prompts]
    state = engine.prefill(samples)
    allowed = text_allowed(tok)
    if beam_width > 1:
        ids = beam_search(engine, state, tok.eos_id, max_new_tokens, beam_width, allowed)
    else:
        ids = engine.generate_until(state, tok.eos_id, max_new_tokens, allowed, temperature, top_k, top_p)
    return [tok.decode_text(row) for row in ids]
