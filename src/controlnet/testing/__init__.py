"""Tiny random models and files for the tests and benchmarks (no test framework; nothing is built at import).

tiny_models: stand-ins with each Stable Diffusion family's structure (UNet, VAE, CLIP text encoder and tokenizer,
scheduler, ControlNet) and their inputs; ldm_files: random-weight single files in the original (LDM) key layout.
"""
