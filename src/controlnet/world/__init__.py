"""The built-in world: procedural scenes with every condition of the paper, the fill50k-style task, and the
tiny base model trained on them (docs/architecture.md#a-built-in-world-runs-on-a-laptop-cpu). Import submodules
directly; nothing runs at import time.
"""
