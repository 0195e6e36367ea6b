"""Embedding-collapse diagnostics: pure metrics (metrics.py), a full pass over a model (report.py), the Lightning
callback that logs them to MLflow (callback.py), and the papers' analyses as commands (toy.py, analyze.py)."""
