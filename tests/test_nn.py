"""Modules: registry, state dicts, modes, moves; and a two-layer MLP that learns (on the GPU: tests/gpu/test_nn.py)."""
import numpy as np
import pytest

import llamac
from llamac.engine import functional
from llamac.errors import LlamacError
from llamac.model import layers as nn


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        self.fc1 = nn.Linear(d_in, d_hidden, bias=True)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=True)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.fc2(self.drop(functional.tanh(self.fc1(x))))


def train_mlp(device: str, steps: int = 300):
    """Plain SGD on a fixed nonlinear regression problem; returns (first loss, last loss)."""
    llamac.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = np.sin(x[:, :2].sum(1, keepdims=True)) + 0.5 * x[:, 2:3] ** 2
    model = MLP(8, 64, 1).to(device)
    xt, yt = llamac.tensor(x, device=device), llamac.tensor(y.astype(np.float32), device=device)
    losses = []
    for _ in range(steps):
        diff = model(xt) - yt
        loss = (diff * diff).mean()
        model.zero_grad()
        loss.backward()
        with llamac.no_grad():
            for p in model.parameters():
                p.data -= 0.1 * p.grad
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_mlp_sgd_reduces_loss_by_90_percent_on_cpu():
    first, last = train_mlp("cpu")
    assert last < 0.1 * first, (first, last)


def test_named_parameters_state_dict_round_trip():
    a, b = MLP(3, 4, 2), MLP(3, 4, 2)
    names = [n for n, _ in a.named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert a.num_params() == 3 * 4 + 4 + 4 * 2 + 2
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    x = llamac.randn(5, 3)
    assert np.array_equal(a(x).numpy(), b(x).numpy())


def test_load_state_dict_errors_name_the_problem():
    m = MLP(3, 4, 2)
    state = m.state_dict()
    with pytest.raises(LlamacError, match="missing fc2.bias"):
        m.load_state_dict({k: v for k, v in state.items() if k != "fc2.bias"})
    with pytest.raises(LlamacError, match=r"fc1.weight.*\(4, 5\)"):
        m.load_state_dict({**state, "fc1.weight": np.zeros((4, 5), np.float32)})


def test_module_lists_train_eval_and_dtype_moves():
    class Stack(nn.Module):
        def __init__(self):
            self.layers = [nn.Linear(2, 2) for _ in range(3)]
            self.norm = nn.RMSNorm(2)

    s = Stack()
    assert len(s.parameters()) == 4
    assert [n for n, _ in s.named_parameters()][0] == "layers.0.weight"
    s.eval()
    assert not s.layers[1].training and not s.training
    s.train()
    assert s.layers[2].training
    s.to(dtype="bfloat16")
    assert all(p.dtype == llamac.engine.backend.bfloat16 for p in s.parameters())


def test_embedding_module_and_rmsnorm_module():
    emb = nn.Embedding(10, 4)
    out = emb(np.array([[1, 2], [3, 1]]))
    assert out.shape == (2, 2, 4)
    assert np.array_equal(out.numpy()[0, 0], emb.weight.numpy()[1])
    norm = nn.RMSNorm(4)
    y = norm(out).numpy()
    assert np.allclose((y * y).mean(-1), 1.0, atol=1e-3)
