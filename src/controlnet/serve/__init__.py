"""`controlnet serve`: one HTTP service (native /v1 API, the web-UI compatible API) on one service layer.

Library-free of FastAPI at import: `models.py` (which models exist) and `service.py` (jobs, queue, worker) import
no web framework; `app.py`, `native.py`, `security.py`, `problems.py` and `webui/` need the `serve` extra.
"""
