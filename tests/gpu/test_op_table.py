"""The fused ops' tables (tests/op_cases.py) on the GPU: the cases and the body of tests/test_op_table.py,
each op's CUDA path (kernels where it has them) against the same float64 references, in fp32 and bf16."""
import pytest

from tests import op_cases


@pytest.mark.parametrize("case, dtype", op_cases.op_params("cuda"))
def test_op_matches_float64(case, dtype):
    op_cases.run_op_case(case, dtype, "cuda")


@pytest.mark.parametrize("dtype, clip", op_cases.adamw_params())
def test_adamw_step_matches_float64(dtype, clip):
    op_cases.run_adamw_case(dtype, clip, "cuda")
