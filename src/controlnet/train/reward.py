"""The consistency reward of ControlNet++ added to the diffusion loss (`--train.reward`).

ControlNet++ (Li et al., "ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback",
ECCV 2024, Sec. 3.2-3.3, Eq. 6-9): add noise to a training image, denoise it in ONE step to a predicted clean image,
decode it, run a frozen detector D of the condition type on it, and penalise the distance to the input condition;
only at small noise levels, where the one-step prediction is close to an image:

    L_total = L_diffusion + lambda * 1[t <= t_thr] * L(c_v, D(Decode(x0'(x_t, t))))                   (Eq. 9)

The one-step x0 prediction of each objective (alpha = abar_t of the DDPM schedule; s = the flow's sigma):

    epsilon       x0' = (x_t - sqrt(1 - alpha) eps') / sqrt(alpha)                       (DDPM, Ho et al. Eq. 15)
    v_prediction  x0' = sqrt(alpha) x_t - sqrt(1 - alpha) v'           (Salimans & Ho 2022, v = a eps - s x0)
    flow          x0' = x_s - s v'                      (x_s = (1 - s) x0 + s eps, v = eps - x0; flow_matching.py)

t_thr: `train.reward_max_timestep` of the base's training timesteps (ControlNet++: 200 of 1000); on a flow base the
matching sigma, s <= t_thr / N (SD3 embeds t = s N). The term is a mean over the micro-batch with zeros for the
samples above the threshold, so its size does not depend on how many fall under it; only those are decoded.

A flow base's micro-batch carries the condition image beside its latents (FlowMicroBatch.cond_unit): the detector
compares with the image, never with a decode of the condition's latents.

The locked base and the VAE get no gradient (requires_grad False); the gradient flows through the decoder and the
detector into the ControlNet's prediction. The decoder's activations are recomputed in backward when
`model.gradient_checkpointing` is on (the decoder at full resolution holds most of the step's activation memory).
The detectors are train/detectors.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from controlnet.generate.base import denormalize_latents
from controlnet.train.detectors import check_detector, detector
from controlnet.train.flow_matching import unpack_latents
from controlnet.train.transformer_step import vae_space

# ControlNet++'s reward threshold: timesteps t <= 200 of the 1000 training timesteps (Sec. 3.3)
PAPER_REWARD_MAX_TIMESTEP = 200
# world tasks whose condition is drawn like these detectors' input (world/dataset.py TASKS)
WORLD_TASK_DETECTORS = {"fill": "fill", "shapes": "fill", "canny": "canny", "seg": "seg", "pose": "pose"}


def resolve_detector(config) -> str:
    """The detector of `config.train.reward_detector`: a name, or "auto": the world dataset's task (world.json).
    A condition without a differentiable detector is refused by name (one line, nothing loaded)."""
    name = config.train.reward_detector
    if name != "auto":
        check_detector(name)
        from controlnet.train.network_detectors import detector_weights

        detector_weights(name, config.train.reward_detector_weights)  # a network's weights: found, or one line
        return name
    world = Path(config.data.path) / "world.json"
    if not world.is_file():
        raise ValueError(
            f"train.reward_detector=auto: {config.data.path} is no world dataset (no world.json); "
            "name the condition's detector: canny, fill, seg or pose"
        )
    task = json.loads(world.read_text()).get("task")
    check_detector(WORLD_TASK_DETECTORS.get(task, task), field=f"train.reward_detector=auto (world task {task!r})")
    return WORLD_TASK_DETECTORS[task]


def _expand(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def predict_x0(pred: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0' (B, C, h, w) from a UNet's output `pred` at x_t `noisy`, alpha = abar_t (B,): see the module docstring."""
    a = _expand(alpha, noisy)
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    raise ValueError(f"prediction_type={prediction_type!r}: expected epsilon or v_prediction")


def predict_x0_flow(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x0' = x_s - s v' of a flow base's velocity `pred` at x_s `noisy`, s (B,)."""
    return noisy - _expand(sigmas, noisy) * pred


class Reward:
    """The weighted consistency term of one micro-batch; built once per run (`Trainer.build_model`)."""

    def __init__(self, config, base, noise_scheduler=None):
        t = config.train
        self.arch = getattr(base, "arch", "unet")
        self.weight, self.max_timestep = t.reward_weight, t.reward_max_timestep
        self.vae = base.vae
        device = next(self.vae.parameters()).device if self.vae is not None else "cpu"
        self.loss = detector(resolve_detector(config), t.reward_detector_weights, device)
        self.scheduler = noise_scheduler
        if self.arch != "unet":  # a flow base: s <= t_thr / N, N its scheduler's training timesteps
            self.num_train_timesteps = base.scheduler.config.num_train_timesteps
            self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.vae is not None and config.model.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (unclamped: a clamp would stop the gradient) of the base's latents
        (B, C, h, w), in the graph. A UNet base: its normalised latents, or pixel space (no VAE: the latents are the
        image in [-1, 1]); a flow base: (z - shift_factor) * scaling_factor (transformer_step.latent_space)."""
        if self.vae is None:
            return (latents.float() + 1) / 2
        # a UNet base's normalised latents, a flow base's transformer space (transformer_step.latent_space)
        z = denormalize_latents(self.vae, latents) if self.arch == "unet" else vae_space(self.vae, latents)
        return (self.vae.decode(z.to(self.vae.dtype)).sample.float() + 1) / 2

    def per_sample(self, x0: torch.Tensor, under: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Detector loss (B,) of the samples where `under` (B,) bool holds, 0 elsewhere (those are not decoded)."""
        out = torch.zeros(len(x0), device=x0.device)
        if bool(under.any()):
            out = out.index_put((under.nonzero()[:, 0],), self.loss(self.decode(x0[under]), cond[under]).float())
        return out

    def unet_terms(self, pred, noisy, timesteps, cond) -> torch.Tensor:
        """Per-sample reward (B,) of a UNet micro-batch: x0' from `pred` at (noisy, timesteps), cond in [0, 1]."""
        config = self.scheduler.config
        alpha = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps]  # (B,)
        x0 = predict_x0(pred.float(), noisy.float(), alpha.float(), config.prediction_type)
        return self.per_sample(x0, timesteps <= self.max_timestep, cond)

    def unet_term(self, pred, noisy, timesteps, cond) -> torch.Tensor:
        """lambda * mean over the micro-batch of `unet_terms` (Eq. 9's second term)."""
        return self.weight * self.unet_terms(pred, noisy, timesteps, cond).mean()

    def flow_x0(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """The one-step x0' (B, C, h, w) of a flow micro-batch (transformer_step.FlowMicroBatch); Flux's packed
        tokens unpacked to the latent grid of the condition image's size."""
        x0 = predict_x0_flow(pred.float(), batch.noisy.float(), batch.sigmas.float())
        if self.arch == "flux":
            h, w = (side // self.vae_factor for side in batch.cond_unit.shape[-2:])
            x0 = unpack_latents(x0, h, w)
        return x0

    def flow_terms(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """Per-sample reward (B,) of a flow micro-batch: the samples with s <= t_thr / N."""
        return self.per_sample(self.flow_x0(pred, batch), self.flow_under(batch.sigmas), batch.cond_unit)

    def flow_term(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """lambda * mean over the micro-batch of `flow_terms` (Eq. 9's second term on a flow base)."""
        return self.weight * self.flow_terms(pred, batch).mean()

    def flow_under(self, sigmas: torch.Tensor) -> torch.Tensor:
        """(B,) bool: s <= t_thr / N, the flow base's sigma matching the timestep threshold."""
        return sigmas <= self.max_timestep / self.num_train_timesteps
