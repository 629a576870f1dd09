"""The two-layer MLP of tests/test_nn.py learns on the GPU as on the CPU."""
from tests.test_nn import train_mlp


def test_mlp_sgd_reduces_loss_by_90_percent_on_gpu():
    first, last = train_mlp("cuda")
    assert last < 0.1 * first, (first, last)
