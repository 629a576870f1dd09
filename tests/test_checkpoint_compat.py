"""A checkpoint written before the package moved into subpackages (commit 2c6de20, the debug recipe
after 50 steps) still loads, and gives the logits that code computed for the same ids."""
from pathlib import Path

import numpy as np

from llamac.engine.tensor import no_grad
from llamac.train.checkpoint import load_model

OLD = Path(__file__).resolve().parent / "data" / "pre_move_checkpoint"


def test_a_checkpoint_from_before_the_move_loads_and_computes_the_same_logits():
    model, tokenizer, _ = load_model(OLD, device="cpu")
    ids = np.load(OLD / "ids.npy")
    assert tokenizer.encode("The king said to the", bos=True) == ids[0].tolist()
    with no_grad():
        logits, _ = model(ids)
    np.testing.assert_allclose(logits.data, np.load(OLD / "logits_2c6de20.npy"), rtol=1e-5, atol=1e-6)
