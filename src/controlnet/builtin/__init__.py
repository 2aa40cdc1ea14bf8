"""The built-in tiny base model (design decision 5): architecture, text model, pretraining recipe, quality check,
commands and the shipped weights (weights/, with its MODEL_CARD.md). The procedural scenes it is trained on live in
`controlnet.world`. Import submodules directly; nothing runs at import time.
"""
