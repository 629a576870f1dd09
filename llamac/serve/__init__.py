"""`llamac serve`: an OpenAI-compatible HTTP server (app) over a continuous-batching engine (scheduler)."""
from __future__ import annotations

from llamac.errors import LlamacError


def require_web_stack():
    """Import the `serve` extra's web stack, or say in one line how to install it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise LlamacError(f"llamac serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'llamac[serve]'") from None
