"""The built-in model's text side: a word-level tokenizer for the world's vocabulary and a tiny CLIP text encoder.

The tokenizer is a real `tokenizers` file (tokenizer.json) built offline from the world's words, loaded through
transformers like any other. The encoder is a transformers `CLIPTextModel` with learned positional embeddings:
without position information "red circle with blue background" and its colour swap are the same bag of tokens
and a base model cannot learn which colour belongs to the shape (measured on an earlier prototype:
docs/architecture.md#the-built-in-prototype).
Its last hidden states (B, L, D) are the UNet's cross-attention context, as in Stable Diffusion (paper Sec. 3.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from controlnet.builtin.config import TextEncoderConfig

# Special tokens. Ids are fixed by their order: pad 0, unk 1, bos 2, eos 3, then the words in sorted order.
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Function words a caption may use beside the world's nouns and colours.
COMMON_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "and",
    "with",
    "on",
    "in",
    "of",
    "at",
    "to",
    "near",
    "behind",
    "front",
    "left",
    "right",
    "above",
    "below",
    "under",
    "over",
    "next",
    "beside",
    "background",
    "foreground",
    "small",
    "large",
    "big",
    "tiny",
    "two",
    "three",
    "four",
    "five",
    "one",
    "is",
    "are",
    "scene",
    "image",
    "photo",
    "picture",
)


def build_tokenizer(words: Iterable[str], max_length: int):
    """A word-level `PreTrainedTokenizerFast` over `words` (+ specials), padding/truncating to `max_length`.

    Unknown words map to <unk>; text is lower-cased and split on whitespace and punctuation.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    if not vocab_words:
        raise ValueError("words: expected at least one word for the vocabulary")
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *vocab_words))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder` (tokenizer.json + tokenizer_config.json), offline."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer folder {folder}: no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def build_text_encoder(config: TextEncoderConfig, tokenizer, projection: bool = False):
    """A randomly initialised `CLIPTextModel` sized by `config`, with the tokenizer's special-token ids (the eos id
    also places the pooled output at the first eos); `projection`: a `CLIPTextModelWithProjection` (SD3 reads its
    pooled projection, builtin-dit)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        projection_dim=config.hidden_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(clip_config)


def tokenize(tokenizer, prompts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids (B, L) padded to the tokenizer's `model_max_length`, as Stable Diffusion pads to 77."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got one string")
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return batch.input_ids.to(device)  # (B, L)


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Cross-attention context (B, L, D): the encoder's last hidden states for every (padded) token."""
    ids = tokenize(tokenizer, prompts, device=text_encoder.device)  # (B, L)
    return text_encoder(input_ids=ids).last_hidden_state  # (B, L, D)
