"""Tokenizers from local folders, refused unless they can encode a plain sentence.

Single checkpoint files hold no tokenizer, so users point at a folder; a wrong folder (a model root instead of its
tokenizer/, an empty one) still gives transformers a tokenizer, which would make every prompt [bos, eos, eos, ...]
and be silently ignored by the UNet. Every loader of a base (generate/base.py, io/single_file.py) checks here.
"""

from __future__ import annotations

import os
from pathlib import Path

# A tokenizer must split this plain sentence into at least MIN_WORD_TOKENS distinct ordinary tokens (not special,
# not unknown). A folder without vocabulary files (the model root instead of its tokenizer/, an empty folder)
# still gives transformers a tokenizer: one of 2 special tokens that maps every prompt to [bos, eos, eos, ...],
# which the UNet would silently ignore. Any real vocabulary (CLIP BPE: 5 word tokens here; the built-in
# word-level one: "a", "photo", "of" and <unk> for "cat") passes.
TOKENIZER_TEST_SENTENCE = "a photo of a cat"
MIN_WORD_TOKENS = 3


def tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer: tokenizers' tokenizer.json, or a BPE vocab.json + merges.txt (CLIP)."""
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def load_tokenizer(folder: str | os.PathLike, flag: str = "tokenizer", **extra):
    """A tokenizer from `folder` (CLIP BPE or tokenizer.json), refused unless it can encode a plain sentence."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: tokenizer folder not found")
    if not tokenizer_files(folder):
        hint = (
            f" (a model folder? pass its tokenizer/ subfolder: {folder / 'tokenizer'})"
            if (folder / "tokenizer").is_dir()
            else ""
        )
        raise ValueError(
            f"{flag} {folder}: holds no tokenizer (expected vocab.json + merges.txt, or tokenizer.json){hint}"
        )
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True, **extra)
    return check_tokenizer(tokenizer, f"{flag} {folder}")


def check_tokenizer(tokenizer, what: str):
    """`tokenizer`, or a ValueError when it cannot encode TOKENIZER_TEST_SENTENCE (see MIN_WORD_TOKENS)."""
    ids = tokenizer(TOKENIZER_TEST_SENTENCE).input_ids
    ignored = set(tokenizer.all_special_ids) | {tokenizer.unk_token_id}
    words = {i for i in ids if i not in ignored}
    if len(words) < MIN_WORD_TOKENS:
        raise ValueError(
            f"{what}: the tokenizer cannot encode a plain sentence ({TOKENIZER_TEST_SENTENCE!r} -> ids {ids}, "
            f"{len(words)} ordinary tokens; expected >= {MIN_WORD_TOKENS}): not a real vocabulary (vocab size "
            f"{len(tokenizer)})"
        )
    return tokenizer
