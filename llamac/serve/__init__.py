"""`llamac serve`: an OpenAI-compatible HTTP server (app) over a continuous-batching engine (scheduler)."""
from __future__ import annotations

from llamac.errors import LlamacError


def require_web_stack():
    """Import the `serve` extra's web stack, or say in one line how to install it."""
    import importlib
    try:
        for name in ("fastapi", "uvicorn"):
            importlib.import_module(name)
    except ImportError as exc:
        raise LlamacError(f"llamac serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'llamac[serve]'") from None
