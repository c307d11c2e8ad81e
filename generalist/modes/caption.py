"""Image captioning: ``<bos> <image>*N <sep>`` in, caption tokens out until ``<eos>``.

Greedy or sampled decoding (:meth:`Engine.generate_until`) or beam search
(:func:`beam_search`, length-normalised log-probabilities), restricted to text ids and ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from generalist.engine import Allowed, DecodeState, Engine, constrain
from generalist.tokenizer import GeneralistTokenizer


def text_allowed(tok: GeneralistTokenizer) -> torch.Tensor:
    """Bool mask (V,): text ids and ``<eos>``."""
    mask = torch.zeros(tok.vocab_size, dtype=torch.bool)
    mask[: tok.layout.text_size] = True
    mask[tok.eos_id] = True
    return mask


@torch.inference_mode()
def beam_search(engine: Engine, state: DecodeState, stop_id: int, max_new_tokens: int, beam_width: int = 4,
                allowed: Allowed = None, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search for every row of ``state`` -> the best continuation per row (``stop_id`` excluded).

    Scores are summed log-probabilities divided by ``length ** length_penalty``; a beam that emits
    ``stop_id`` is finished and competes with the others at the end. KV-cached: beams are gathered
    with :meth:`Engine.select`, never recomputed.
    """
    b = state.batch_size
    engine.repeat(state, beam_width)  # (B*W)
    n = b * beam_width
    logp = torch.full((b, beam_width), float("-inf"), dtype=torch.float64)
    logp[:, 0] = 0.0  # all beams start identical: keep one alive so the first step is not W duplicates
    seqs: list[list[int]] = [[] for _ in range(n)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    for _ in range(max_new_tokens):
        logits, offset = constrain(state.logits, allowed, state.logits_offset)
        cand = logp.view(n, 1) + logits.double().log_softmax(-1)  # (N, V')
        cand = cand.view(b, -1)  # (B, W*V')
        top, idx = cand.topk(2 * beam_width, dim=1)  # (B, 2W): room to replace finished beams
        width = logits.shape[-1]
        new_rows, new_tokens, new_logp = [], [], torch.full((b, beam_width), float("-inf"), dtype=torch.float64)
        for i in range(b):
            kept = 0
            for score, j in zip(top[i].tolist(), idx[i].tolist(), strict=True):
                if kept == beam_width or score == float("-inf"):
                    break
                row, token = i * beam_width + j // width, j % width + offset
                if token == stop_id:
                    finished[i].append((score / max(1, len(seqs[row])) ** length_penalty, seqs[row]))
                    continue
                new_rows.append(row)
                new_tokens.append(token)
                new_logp[i, kept] = score
                kept += 1
            while kept < beam_width:  # pad with a dead copy so every row keeps W beams
                new_rows.append(i * beam_width)
                new_tokens.append(stop_id)
                kept += 1
        seqs = [seqs[r] + [t] for r, t in zip(new_rows, new_tokens, strict=True)]
        logp = new_logp
        if all(len(f) >= beam_width for f in finished) or not torch.isfinite(logp).any():
            break
        engine.select(state, torch.tensor(new_rows))
        engine.feed(state, torch.tensor(new_tokens)[:, None])
    out = []
    for i in range(b):
        alive = [(float(logp[i, k]) / max(1, len(seqs[i * beam_width + k])) ** length_penalty,
                  seqs[i * beam_width + k]) for k in range(beam_width) if torch.isfinite(logp[i, k])]
        best = max(finished[i] + alive, key=lambda x: x[0], default=(0.0, []))
        out.append(best[1])
    return out


def caption(engine: Engine, tok: GeneralistTokenizer, images: Sequence[Image.Image | np.ndarray],
            max_new_tokens: int = 32, beam_width: int = 1, temperature: float = 0.0,
            top_k: int | None = None) -> list[str]:
    """Caption each image -> one string per image (greedy by default; ``beam_width > 1`` for beams).

    Example: ``caption(Engine(model), tok, [Image.open("cat.png")])``.
    """
    state = engine.prefill([tok.encode_image_caption(im) for im in images])
    allowed = text_allowed(tok)
    if beam_width > 1:
        ids = beam_search(engine, state, tok.eos_id, max_new_tokens, beam_width, allowed)
    else:
        ids = engine.generate_until(state, tok.eos_id, max_new_tokens, allowed, temperature, top_k)
    return [tok.decode_text(row) for row in ids]
