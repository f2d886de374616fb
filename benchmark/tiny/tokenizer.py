"""Byte-level BPE tokenizer for the tiny target (Hugging Face ``tokenizers``), with a reserved mask token.

Special tokens come first: ``<|endoftext|>`` = 0 (document separator, eos, pad) and ``<|mask|>`` = 1
(the DSpark block mask; it never occurs in text, so the target never emits it, like Qwen3's unused
row 151669).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (specials included) on ``texts``."""
    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 4096:
        raise ValueError(f"tokenizer.py: vocab_size must be in (258, 4096], found {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"tokenizer.py: expected {name} at id {i}, found {tok.token_to_id(name)}")
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer.py: BPE training produced {tok.get_vocab_size()} entries, expected {vocab_size} "
            "(too little training text for this vocabulary)"
        )
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` loadable by ``transformers.AutoTokenizer``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    with open(out_dir / "tokenizer_config.json", "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
