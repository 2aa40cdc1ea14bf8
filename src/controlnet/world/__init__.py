"""The built-in world: procedural scenes with every condition of the paper, the fill50k-style task, and the
tiny base model trained on them (design decision 5). Import submodules directly; nothing runs at import time.
"""
