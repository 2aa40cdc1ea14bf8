"""Controlled generation (paper Sec. 3.4): the pipeline and what it is built from.

The pipeline (pipeline.py, numbered steps), guidance (CFG, control modes, CFG resolution weighting, windows),
samplers by name, prompt encoding, control images, generation options, outputs (PNG metadata), JSONL manifest
batches, the one base loader (base.py) and the `controlnet generate` command. Import submodules directly.
"""
