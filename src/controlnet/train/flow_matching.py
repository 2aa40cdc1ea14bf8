"""The rectified-flow objective of SD3 / SD3.5 and Flux bases, as small functions (train/transformer_step.py calls them).

SD3 paper (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2-3): data x_0 and noise eps ~ N(0, I) are
joined by a straight line, and the network v_theta predicts its velocity:

    x_s = (1 - s) x_0 + s eps                                                        (Eq. 3 with a_s = 1 - s, b_s = s)
    L   = E_{s ~ pi(s), x_0, eps} w(s) || v_theta(x_s, s, c) - (eps - x_0) ||^2            (Eq. 9 in velocity form)

With a ControlNet the velocity is the controlled transformer's, v_theta(x_s, s, c_t, c_f): the locked base plus the
zero-initialised residuals of the trainable copy (model/transformer_controlnet.py), so at step 0 it is the base's.

The density pi(s) and weighting w(s) are diffusers' own (`diffusers.training_utils`, used as its
`train_controlnet_sd3.py` / `train_controlnet_flux.py` do with one `--weighting_scheme`):
    logit_normal   s = sigmoid(n), n ~ N(logit_mean, logit_std)                                     (SD3 paper Eq. 19)
    mode           s = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)                    (SD3 paper Eq. 20)
    sigma_sqrt     s ~ U(0, 1), w = s^-2;   cosmap: s ~ U(0, 1), w = 2 / (pi (1 - 2 s + 2 s^2))    (SD3 paper Eq. 21)
    uniform, none  s ~ U(0, 1), w = 1
As there, the draw u in [0, 1) picks one of the scheduler's N training sigmas, index floor(u N), and the grid is
shifted toward noise: s' = shift s / (1 + (shift - 1) s) (SD3 paper Sec. 5.3.2; FlowMatchEulerDiscreteScheduler's
`shift`, or for a base with dynamic shifting, Flux dev, exp(mu) of the image's token count as its pipeline samples).

The transformer takes t = s N (SD3: N = 1000 timesteps) or s itself (Flux: its pipeline passes t / 1000).
"""

from __future__ import annotations

import torch

# FluxPipeline / FluxControlNetPipeline call the transformer with `timestep / 1000`: Flux embeds s in [0, 1].
FLUX_TIMESTEP_DIVISOR = 1000.0
# Flux packs each 2x2 patch of latent pixels into one token (FluxPipeline._pack_latents).
FLUX_PACKING = 2


def training_shift(scheduler_config, shift: float, image_tokens: int) -> float:
    """The shift of the training sigmas: `shift` when given (> 0), else the scheduler's: with
    `use_dynamic_shifting` (Flux dev) exp(mu) for `image_tokens` tokens, as FluxPipeline computes mu, else its `shift`."""
    if shift:
        return float(shift)
    config = scheduler_config
    if config.get("use_dynamic_shifting"):
        import math

        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)
    return float(config.get("shift", 1.0))


def sigma_grid(num_train_timesteps: int, shift: float) -> torch.Tensor:
    """The scheduler's N training sigmas, descending from 1 (N,) float32, shifted as
    FlowMatchEulerDiscreteScheduler.__init__ does: s = linspace(1, N, N)[::-1] / N, s' = shift s / (1 + (shift-1) s)."""
    n = num_train_timesteps
    sigmas = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n  # (N,)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    scheme: str,
    n: int,
    grid: torch.Tensor,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """n training sigmas (n,) float32 drawn by `scheme` from `grid` (`sigma_grid`), with diffusers' density and
    index rule: u = compute_density_for_timestep_sampling(...), index = floor(u N) (train_controlnet_sd3.py)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=n,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )  # (n,) in [0, 1]
    indices = (u * len(grid)).long().clamp(0, len(grid) - 1)  # u = 1 exactly (float rounding) stays on the grid
    return grid[indices]


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x_0 + s eps (SD3 paper Eq. 3), s (B,) broadcast over the other dimensions of x_0 (B, ...)."""
    s = sigmas.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dx_s / ds = eps - x_0: what the transformer predicts (diffusers' trainers' `target = noise - model_input`)."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """w(s) || pred - target ||^2, the mean over each sample's elements, then over the batch (diffusers' SD3 trainer);
    w from diffusers' compute_loss_weighting_for_sd3 (1 for logit_normal, mode, uniform, none)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas.float())  # (B,)
    per_sample = ((pred.float() - target.float()) ** 2).reshape(len(pred), -1).mean(dim=1)  # (B,)
    return (weighting.float() * per_sample).mean()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's tokens: (B, C, h, w) -> (B, h/2 * w/2, 4 C), FluxPipeline._pack_latents."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: Flux's tokens (B, h/2 * w/2, 4 C) -> latents (B, C, h, w),
    FluxPipeline._unpack_latents given the latent size (its VAE factor 1)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, h, w, 1)


def latent_image_ids(h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """Flux's rotary positions of the packed tokens of an (h, w) latent: (h/2 * w/2, 3), as FluxPipeline's
    `_prepare_latent_image_ids(batch, h // 2, w // 2, ...)`."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // FLUX_PACKING, w // FLUX_PACKING, device, dtype)
