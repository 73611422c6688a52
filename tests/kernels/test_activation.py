"""kernels/activation.py: the Triton SwiGLU against qmoe's torch formula (reference.swiglu)."""

import pytest
import torch

from qmoe.backends.reference import swiglu as torch_swiglu
from qmoe.kernels.activation import swiglu_rows
from qmoe.spec import SwiGLU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("act", [SwiGLU(alpha=1.702, beta=1.0, limit=7.0), SwiGLU()])
@pytest.mark.parametrize("R,I,dtype", [(3, 40, torch.bfloat16), (5, 1500, torch.bfloat16), (2, 17, torch.float32)])
def test_rows_equal_the_torch_formula(act, R, I, dtype):
    g = torch.Generator().manual_seed(R * I)
    h = (torch.randn(R, 2 * I, generator=g) * 6).to(dtype).to(DEVICE)  # past the limit too
    h[0, 1], h[-1, I + 2] = float("nan"), float("nan")                # NaN gate, NaN up
    out = torch.full((R, I), 7.0, dtype=dtype, device=DEVICE)
    assert swiglu_rows(h, out, act.alpha, act.beta, act.limit) is out
    want = torch_swiglu(act, h[:, :I].double(), h[:, I:].double())
    assert torch.isnan(out[0, 1]) and torch.isnan(out[-1, 2]), "NaN is kept through the clamps"
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    err = (out.double()[~nan] - want[~nan]).norm() / want[~nan].norm()
    assert err < tol, err


def test_shapes_are_checked():
    h = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \[R, 2I\] and \[R, I\]"):
        swiglu_rows(h, torch.zeros(2, 5, device=DEVICE), 1.0, 0.0, None)
    assert swiglu_rows(h[:0], torch.zeros(0, 4, device=DEVICE), 1.0, 0.0, None).shape == (0, 4)
