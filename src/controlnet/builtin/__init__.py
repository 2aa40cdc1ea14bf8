"""The built-in tiny base model (docs/architecture.md#a-built-in-world-runs-on-a-laptop-cpu): architecture, text
model, pretraining recipe, quality check, commands and the shipped weights (weights/, with its MODEL_CARD.md). The
procedural scenes it is trained on live in `controlnet.world`. Import submodules directly; nothing runs at import
time.
"""
