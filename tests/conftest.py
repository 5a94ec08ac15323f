import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Unit roundoff of each storage dtype: the error of one final rounding to storage.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

#: Unit roundoff of the arithmetic the kernels use for each storage dtype (float32 for the low precisions).
COMPUTE_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-24,
    torch.float16: 2.0**-24,
}

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
