"""Rebuild ``generalist/default_tokenizer`` (package data): a byte-level BPE trained on CPython's documentation text.

The corpus is ``pydoc_data.topics`` (shipped with every CPython), so the recipe runs on any machine
without a network. Byte-level BPE means no character is ever unknown: unseen characters fall back
to their UTF-8 bytes.

    python tokenizers_cfg/build_default.py            # writes generalist/default_tokenizer/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import tyro
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from generalist import GeneralistTokenizer


@dataclass
class Args:
    out: Path = Path(__file__).parents[1] / "generalist" / "default_tokenizer"
    """Directory the tokenizer is saved to."""
    vocab_size: int = 2048
    """Text BPE vocabulary size (small: the model trains on a CPU)."""
    image_size: int = 64
    """Images are fitted into an image_size x image_size box (multiple of 16)."""


def train_text_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [topics[k] for k in sorted(topics)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def main(args: Args) -> None:
    tok = GeneralistTokenizer(train_text_bpe(args.vocab_size), image_size=args.image_size)
    tok.save_pretrained(args.out)
    print(f"saved {args.out} (text {tok.layout.text_size}, vocabulary {tok.vocab_size})")


if __name__ == "__main__":
    main(tyro.cli(Args))
