"""Shared pytest hooks: tests marked `cuda` skip, with the reason, where no CUDA GPU with CuPy is usable;
and the fixtures several test modules share."""
from pathlib import Path

import pytest

DEBUG_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "pretrain" / "debug.yaml"


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """Tokenizer and shards of the debug recipe, made once for the whole session."""
    from llamac.config import load_recipe
    from llamac.data.pipeline import prepare_data
    path = tmp_path_factory.mktemp("debug_data")
    prepare_data(load_recipe(DEBUG_RECIPE, [f"data.shard_dir={path}", f"out_dir={path}"]), verbose=False)
    return path


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return  # don't probe for CuPy (slow to import) when nothing needs it
    from llamac.engine import backend
    from llamac.errors import LlamacError

    if backend.cuda_available():
        return
    try:
        backend.cupy_module()
        reason = "CUDA is not available"
    except LlamacError as exc:  # says why: no CuPy, no driver, no GPU
        reason = str(exc)
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU and CuPy: {reason}")
    for item in cuda_items:
        item.add_marker(skip)
