"""Every test under tests/gpu/ needs a CUDA GPU with CuPy: each one gets the `cuda` marker here, so
`pytest -m cuda` selects them, `-m "not cuda"` leaves them out, and tests/conftest.py skips them, with
the reason, where no GPU is usable. Tests that run without a GPU (NVRTC compile checks included) live
in tests/, beside this folder."""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)   # before the -m selection and tests/conftest.py's skips read the markers
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cuda)
