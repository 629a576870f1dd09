"""`llamac-lm-eval`: lm_eval's command line with the llamac model type (llamac.eval.harness)."""
from __future__ import annotations

import sys

from llamac.errors import LlamacError


def harness_main() -> None:
    """Without lm-eval installed, one line saying how to get it."""
    try:
        from llamac.eval.harness import main
    except LlamacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    main()
