"""The web page (`controlnet serve`, at /ui): gradio on the server's own FastAPI app, calling serve's service layer.

form.py (form values <-> GenerationJob, no gradio), annotator_controls.py (an annotator's schema as controls),
page.py (the Blocks and its events), mount.py (mounting with gradio's safety settings). Needs the `ui` extra.
"""
