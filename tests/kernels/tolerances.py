"""The one tolerance table of the kernel tests, and the comparison every test uses.

A result computed in ``dtype`` is compared with the plain-torch reference computed in fp32
on the same inputs (bf16 inputs are upcast, so both see the same rounded values). An
element passes when

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(1, max |expected|)

The absolute part is relative to the tensor's largest magnitude because the outputs here
are sums (matmuls, row reductions): their rounding error scales with the size of the
summed terms, not with the (possibly cancelled) result, so an element near zero in a
tensor of magnitude 400 carries an error of that tensor's order.

bf16: 1e-2 is ~2.5 bf16 ulps (2**-8 relative spacing) at the tensor's scale and per
element: the kernels round once where the reference rounds after every op, and the
comparison is against fp32. fp32: the kernels sum in a different order than torch's
BLAS/reductions; 1e-5 leaves ~50x headroom over the measured 2e-7 relative errors without
hiding a wrong formula (a wrong term costs O(1) relative error).

Never loosen an entry for one test: fix the kernel or the test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``actual`` (computed in ``dtype``) matches the fp32 reference ``expected``."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(e)
    same_nonfinite = torch.equal(torch.isfinite(a), finite) and torch.equal(
        a[~finite].nan_to_num(), e[~finite].nan_to_num())
    assert same_nonfinite, f"{what} ({dtype}): the NaN/inf elements differ from the reference's"
    scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
    err = (a - e).abs().where(finite, 0.0)
    bound = tol.atol * scale + tol.rtol * e.abs()
    bad = (err > bound) & finite
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{e.numel()} elements off; worst error "
            f"{err.max().item():.3g} at scale {scale:.3g} (atol {tol.atol} x scale, rtol {tol.rtol}); "
            f"first at {list(i)}: {a[i].item():.6g} vs {e[i].item():.6g}"
        )


def assert_no_less_accurate(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor,
                            what: str = "", factor: float = 2.0) -> None:
    """For results of many low-precision ops (a whole model step in bf16), whose rounding
    error compounds layer after layer: ``actual`` (the kernels) may be no further from the
    fp32 result ``exact`` than ``factor`` times the error of ``reference`` (the reference
    ops in the same low precision). The yardstick is the reference's own error, not a
    fixed tolerance; the kernels round once per fused op where the reference rounds per op."""
    a, r, e = (t.detach().double().cpu() for t in (actual, reference, exact))
    err, ref_err = (a - e).abs().max().item(), (r - e).abs().max().item()
    assert err <= factor * ref_err + 1e-6 * max(1.0, e.abs().max().item()), (
        f"{what}: error {err:.3g} against fp32 > {factor} x the reference's own error {ref_err:.3g}"
    )
