"""The shared Triton helpers: rounding to bf16 and the dot product under the interpreter."""

import pytest
import torch
from kernel_utils import DEVICE, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="no Triton")

if TRITON_RUNS:
    import triton
    import triton.language as tl

    from peftloop.kernels._triton_utils import cast, dot

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, cast(x, y_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        c = dot(a, b, tl.zeros((M, N), dtype=tl.float32), "ieee")
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, for inf in fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_rounds_like_torch(dtype):
    """Round to nearest even, bit for bit with torch, including ties, carries into the
    exponent, overflow to inf, subnormals and NaN (the interpreter's own cast truncates)."""
    special = [1.99999, 1.9960938, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.0e-39, -1e-40, 3.39e38, -3.4e38, 255.9,
               0.0, -0.0, float("inf"), float("-inf"), float("nan")]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10, torch.tensor(special)]).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])


def test_dot_of_bf16_operands_is_the_fp32_product():
    """Under the interpreter tl.dot on bf16 multiplies bit patterns; dot() upcasts first."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(32, 16, generator=g).to(DEVICE, torch.bfloat16)
    c = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    expected = a.double() @ b.double()
    assert (c.double() - expected).abs().max().item() < 1e-4  # fp32 accumulation of exact bf16 products
