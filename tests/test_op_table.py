"""The fused ops' tables (tests/op_cases.py) on the CPU: every case against its float64 references, and
in float64 its gradients against central differences. The same cases run on the GPU in
tests/gpu/test_op_table.py."""
import pytest

from tests import op_cases


@pytest.mark.parametrize("case, dtype", op_cases.op_params("cpu"))
def test_op_matches_float64(case, dtype):
    op_cases.run_op_case(case, dtype, "cpu")


@pytest.mark.parametrize("dtype, clip", op_cases.adamw_params())
def test_adamw_step_matches_float64(dtype, clip):
    op_cases.run_adamw_case(dtype, clip, "cpu")
