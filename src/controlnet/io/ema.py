"""Files that hold two UNets: the raw weights and their exponential moving average (EMA).

Original training checkpoints (e.g. v1-5-pruned) hold `model.diffusion_model.<key>` (the raw weights, the ones
fine-tuning continues from) and `model_ema.diffusion_model<key without dots>` (the EMA weights, usually better
for sampling). Every reader of such a file (generate, train, init, transfer, `load_unet`, the base loader) makes
the choice here, with one keyword (`ema`: True, False, or None for the reader's default) and one line naming the
weights it used. The EMA keys are dropped either way, so diffusers' converter sees one UNet and gives no advice
about command-line flags that are not ours (its `--extract_ema`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
# How the choice is spelled where it comes from (library keywords by default; the commands pass their flags).
EMA_KEYWORDS = {"ema": "ema=True", "no_ema": "ema=False"}


def ema_twins(state: dict) -> dict[str, str]:
    """{UNet key: its EMA twin's key} when `state` holds an EMA copy of every UNet weight, else {}."""
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    twins = {k: EMA_PREFIX + "".join(k.split(".")[1:]) for k in unet_keys}
    return twins if unet_keys and all(t in state for t in twins.values()) else {}


def select_unet_weights(
    state: dict, ema: bool | None, what: str, flags: dict | None = None, default: bool = True
) -> tuple[dict, bool | None]:
    """(`state` with the chosen UNet under `model.diffusion_model.*` and no `model_ema.*` key, the choice).

    ema: True = the EMA weights (refused when the file has none), False = the raw ones, None = `default`. The
    choice returned is True (EMA) or False (raw) for a file holding both, None for a file holding one UNet. A file
    holding both gets one log line naming the weights used and the flag for the others. `state` may hold meta
    tensors (names and shapes only): entries are moved, never copied.
    """
    flags = {**EMA_KEYWORDS, **(flags or {})}
    twins = ema_twins(state)
    if ema and not twins:
        raise ValueError(f"{flags['ema']}: {what} holds no EMA UNet weights (model_ema.*)")
    chosen = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    if not twins:
        return chosen, None
    use_ema = default if ema is None else bool(ema)
    if use_ema:
        chosen.update({k: state[t] for k, t in twins.items()})
        logger.warning("%s: using the EMA UNet weights (model_ema.*); %s for the raw ones", what, flags["no_ema"])
    else:
        logger.warning(
            "%s: using the raw UNet weights (model.diffusion_model.*), not the EMA ones; %s for those",
            what,
            flags["ema"],
        )
    return chosen, use_ema
