"""backends.base.output_buffer / finish_output: where a bf16 kernel writes, and how out gets it."""

import torch

from qmoe.backends.base import finish_output, output_buffer


def test_out_itself_when_the_kernel_can_write_it():
    out = torch.full((3, 8), 7.0, dtype=torch.bfloat16)
    assert output_buffer(out, 8) is out
    y = output_buffer(out, 8)
    y.fill_(2.0)
    shared = torch.ones(3, 8)
    assert finish_output(out, y, shared) is out and torch.equal(out, torch.full((3, 8), 3.0, dtype=torch.bfloat16))


def test_a_buffer_for_padded_columns_other_dtypes_and_strides():
    for out in (torch.zeros(3, 8, dtype=torch.bfloat16), torch.zeros(3, 8), torch.zeros(8, 3, dtype=torch.bfloat16).T):
        cols = 16 if out.dtype == torch.bfloat16 and out.is_contiguous() else 8
        y = output_buffer(out, cols)
        assert y is not out and y.shape == (3, cols) and y.dtype == torch.bfloat16
        y.copy_(torch.arange(3 * cols, dtype=torch.float32).reshape(3, cols))
        finish_output(out, y)
        assert torch.equal(out, y[:, :8].to(out.dtype)), "the first H columns, in out's dtype"
