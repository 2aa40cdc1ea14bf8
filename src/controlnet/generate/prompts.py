"""Text conditioning c_t for the UNet and the ControlNets (paper Sec. 3.2: the prompt reaches both through
cross-attention to a CLIP text encoder's hidden states).

SD1.x/2.x and the built-in model: the last hidden states (B, L, D) of one CLIP text encoder, prompts padded to
the tokenizer's `model_max_length` (77 for CLIP). SDXL: the penultimate hidden states of two encoders
concatenated along the channels, plus the second encoder's pooled projection for the added time embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeddings:
    """Cross-attention context of a batch of prompts (and SDXL's pooled text embedding)."""

    context: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, D_pooled), SDXL only


def _tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return batch.input_ids.to(device)  # (B, L)


@torch.no_grad()
def encode_single(tokenizer, text_encoder, prompts: Sequence[str], clip_skip: int = 0) -> PromptEmbeddings:
    """SD1.x/2.x: last hidden states (B, L, D); `clip_skip` > 0 takes an earlier layer (and its final norm)."""
    device = next(text_encoder.parameters()).device
    ids = _tokenize(tokenizer, prompts, device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    if clip_skip <= 0:
        return PromptEmbeddings(text_encoder(ids, attention_mask=mask)[0])  # (B, L, D)
    layers = text_encoder.config.num_hidden_layers
    if clip_skip >= layers:
        raise ValueError(f"clip_skip={clip_skip}: this text encoder has {layers} layers; expected < {layers}")
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 and 5 layouts
    return PromptEmbeddings(final_norm(hidden))


@torch.no_grad()
def encode_dual(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str]) -> PromptEmbeddings:
    """SDXL: penultimate hidden states of every encoder concatenated (B, L, D1 + D2); pooled from the last one."""
    contexts, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = _tokenize(tokenizer, prompts, next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, D_pooled)
            pooled = out[0]
        contexts.append(out.hidden_states[-2])  # (B, L, D_k)
    if pooled is None:
        raise ValueError(
            "SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as text_encoder_2"
        )
    return PromptEmbeddings(torch.cat(contexts, dim=-1), pooled)
