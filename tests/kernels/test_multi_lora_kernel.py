"""multi_lora_linear: K adapters on one frozen base, each on its own segment of rows, against the
reference (per segment ``lora_linear_reference``) and against K independent ``lora_linear`` calls
on the segments' rows (same implementation, same dropout), forward and every gradient, torch
path and the segmented Triton kernels (interpreted on a CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_utils import DEVICE, DTYPES, IMPLS, TRITON_RUNS, fp32_copy, property_settings, randn, run
from tolerances import assert_close

from peftloop.kernels import (
    backend,
    lora_dropout_mask,
    lora_linear,
    multi_lora_linear,
    multi_lora_linear_reference,
    nf4_lora_linear,
)
from peftloop.kernels.lora_linear import draw_dropout, dropout_mask_like
from peftloop.kernels.multi_lora import MultiLoRALinearFunction
from peftloop.nf4 import quantize_nf4

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="no Triton")
IN, OUT, SEQ = 21, 19, 3


class Case:
    """A drawn call: K adapters of differing ranks, segments of 0+ rows with base-only rows between."""

    def __init__(self, ranks, seg_rows, gaps, dtype, needs, seed=0, in_f=IN, out_f=OUT, seq=SEQ, bias=True):
        self.K, self.dtype = len(ranks), dtype
        self.segments, row = [], 0
        order = list(range(self.K))[::-1] if seed % 2 else list(range(self.K))  # not always in adapter order
        for k, n, gap in zip(order, seg_rows, gaps):
            row += gap
            self.segments.append((k, row, row + n))
            row += n
        self.rows = row + gaps[-1]
        need_x, need_A, need_B = needs[0], needs[1:1 + self.K], needs[1 + self.K:]
        self.x = randn(self.rows, seq, in_f, dtype=dtype, seed=seed, requires_grad=need_x)
        self.weight = randn(out_f, in_f, dtype=dtype, scale=in_f**-0.5, seed=seed + 1)
        self.bias = randn(out_f, dtype=dtype, seed=seed + 2) if bias else None
        self.As = [randn(r, in_f, dtype=dtype, scale=in_f**-0.5, seed=seed + 10 + k, requires_grad=need_A[k])
                   for k, r in enumerate(ranks)]
        self.Bs = [randn(out_f, r, dtype=dtype, scale=0.5, seed=seed + 20 + k, requires_grad=need_B[k])
                   for k, r in enumerate(ranks)]
        self.scalings = [0.5 + k for k in range(self.K)]

    @property
    def inputs(self):
        return [self.x, *self.As, *self.Bs]

    def rows_of(self, k):
        return next((s, e) for a, s, e in self.segments if a == k)


def _grads(y, inputs, dtype, g=None):
    """d(Σ y ⊙ g)/d inputs for a fixed g (drawn when not given); None for inputs without grad or
    that y does not reach."""
    g = randn(*y.shape, dtype=dtype, seed=1).to(y.dtype) if g is None else g.to(y.dtype)
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted or not y.requires_grad:
        return [None] * len(inputs), g
    got = iter(torch.autograd.grad(y, wanted, g, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs], g


@contextlib.contextmanager
def checked_backward():
    """Fails when the Function's backward returns a gradient for an input that needs none."""
    original, wrong, calls = MultiLoRALinearFunction.backward, [], []

    def spy(ctx, grad_y):
        result = original(ctx, grad_y)
        calls.append(1)
        for i, (need, g) in enumerate(zip(ctx.needs_input_grad, result, strict=True)):
            if not need and g is not None:
                wrong.append(f"input {i}")
        return result

    MultiLoRALinearFunction.backward = staticmethod(spy)
    try:
        yield calls
    finally:
        MultiLoRALinearFunction.backward = staticmethod(original)
    assert not wrong, f"the backward returned gradients for inputs that need none: {wrong}"


def _check_against_reference(case: Case, impl: str, p=None, masks=None, ref_masks=None, seeds=None, **op_kw):
    """Forward and every gradient against the fp32 reference on the same (rounded) values."""
    with checked_backward() as calls:
        y = run(impl, multi_lora_linear, case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
                case.segments, p, dropout_masks=masks, seeds=seeds, **op_kw)
        got, g = _grads(y, case.inputs, case.dtype)
    assert y.dtype == case.dtype and y.shape == (*case.x.shape[:-1], case.weight.shape[0])
    assert bool(calls) == any(t is not None for t in got)
    ref_inputs = [fp32_copy(t) for t in case.inputs]
    x32, As32, Bs32 = ref_inputs[0], ref_inputs[1:1 + case.K], ref_inputs[1 + case.K:]
    ref_masks = masks if ref_masks is None else ref_masks
    ref = multi_lora_linear_reference(x32, case.weight.float(), fp32_copy(case.bias), As32, Bs32,
                                      case.scalings, case.segments, p, ref_masks)
    assert_close(y, ref, case.dtype, "y")
    expected = torch.autograd.grad(ref, [t for t in ref_inputs if t.requires_grad], g.float(),
                                   allow_unused=True) if any(t.requires_grad for t in ref_inputs) else []
    expected = iter(expected)
    for name, t, got_t in zip(_names(case.K), ref_inputs, got, strict=True):
        want = next(expected) if t.requires_grad else None
        assert (got_t is None) == (want is None), f"d {name}: None {got_t is None}, reference {want is None}"
        if want is not None:
            assert got_t.dtype == t.dtype or t.dtype == torch.float32
            assert_close(got_t, want, case.dtype, f"d {name}")


def _names(K):
    return ["x", *[f"A{k}" for k in range(K)], *[f"B{k}" for k in range(K)]]


def _check_against_single_adapters(case: Case, impl: str, p, seeds=None, rng_seeds=None):
    """Each segment's rows and gradients equal ``lora_linear`` on those rows alone (same impl),
    with its adapter's dropout: a seed given (``seeds``), or drawn from an RNG state seeded with
    ``rng_seeds[k]`` (the single op then runs after ``torch.manual_seed(rng_seeds[k])``)."""
    rng_states = None if rng_seeds is None else {k: torch.Generator().manual_seed(s).get_state()
                                                 for k, s in enumerate(rng_seeds)}
    y = run(impl, multi_lora_linear, case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
            case.segments, p, seeds=seeds, rng_states=rng_states)
    got, g = _grads(y, case.inputs, case.dtype)
    for k, start, end in case.segments:
        if end == start:
            continue
        x_k = case.x.detach()[start:end].clone().requires_grad_(case.x.requires_grad)
        A, B = (t.detach().clone().requires_grad_(t.requires_grad) for t in (case.As[k], case.Bs[k]))
        kw = {} if seeds is None else {"seed": seeds[k]}
        if rng_seeds is not None:
            torch.manual_seed(rng_seeds[k])
        y_k = run(impl, lora_linear, x_k, case.weight, case.bias, A, B, case.scalings[k], dropout_p=p[k],
                  **kw)
        if rng_seeds is not None:  # adapter k's state advanced as the global one did
            assert torch.equal(rng_states[k], torch.get_rng_state())
        assert_close(y[start:end], y_k.float(), case.dtype, f"y of adapter {k}")
        want, _ = _grads(y_k, [x_k, A, B], case.dtype, g[start:end])
        pairs = [(got[0], want[0], "x"), (got[1 + k], want[1], f"A{k}"),
                 (got[1 + case.K + k], want[2], f"B{k}")]
        for mine, theirs, name in pairs:
            if mine is not None and name == "x":
                mine = mine[start:end]
            assert (mine is None) == (theirs is None), name
            if theirs is not None:
                assert_close(mine, theirs.float(), case.dtype, f"d {name} (adapter {k})")


def _draw_case(data, dtype, max_k=4):
    K = data.draw(st.integers(1, max_k), label="K")
    ranks = data.draw(st.lists(st.integers(1, 17), min_size=K, max_size=K), label="ranks")
    seg_rows = data.draw(st.lists(st.integers(0, 3), min_size=K, max_size=K), label="rows per segment")
    gaps = data.draw(st.lists(st.integers(0, 2), min_size=K + 1, max_size=K + 1), label="base-only rows")
    needs = data.draw(st.lists(st.booleans(), min_size=1 + 2 * K, max_size=1 + 2 * K), label="needs grad")
    in_f = data.draw(st.sampled_from([7, 21, 33]), label="in")
    out_f = data.draw(st.sampled_from([5, 19, 35]), label="out")
    seq = data.draw(st.integers(1, 3), label="seq")
    seed = data.draw(st.integers(0, 99), label="seed")
    bias = data.draw(st.booleans(), label="bias")
    return Case(ranks, seg_rows, gaps, dtype, needs, seed=seed, in_f=in_f, out_f=out_f, seq=seq, bias=bias)


# ---------------------------------------------------------------------------------------
# Quick, fixed cases
# ---------------------------------------------------------------------------------------

FIXED = dict(ranks=[3, 17, 1], seg_rows=[4, 1, 3], gaps=[0, 2, 0, 1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_lora_matches_the_reference(impl, dtype):
    case = Case(**FIXED, dtype=dtype, needs=[True] * 7)
    _check_against_reference(case, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_lora_with_stored_masks_matches_the_reference(impl):
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    p = [0.3, 0.0, 0.5]
    masks = {}
    for k, start, end in case.segments:
        shape = case.x[start:end].shape
        masks[k] = torch.rand(shape, generator=torch.Generator().manual_seed(k)).to(DEVICE) >= p[k]
    _check_against_reference(case, impl, p=p, masks=masks)


@pytest.mark.parametrize("impl", IMPLS)
def test_each_segment_is_the_single_adapter_op_on_its_rows(impl):
    """Dropout drawn from each adapter's own RNG state: the single op on the segment's rows,
    run after seeding the global RNG the same way, draws the same mask (torch path) or seed
    (kernels), and leaves the global state where adapter k's state is left."""
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    _check_against_single_adapters(case, impl, [0.3, 0.1, 0.5], rng_seeds=[5, 6, 7])


def test_dropout_masks_are_saved_through_the_saved_tensor_hooks():
    """Activation checkpointing and offloading work through saved-tensor hooks: a mask kept
    anywhere else (on ctx) would stay alive for every checkpointed layer until its backward pass
    (measured: 290 MiB of masks at K = 2 on SmolLM2-135M's shape). Every mask goes through pack
    and comes back through unpack, and the gradients are those of a run without hooks."""
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    p = [0.3, 0.0, 0.5]
    masks = {k: torch.rand(case.x[s:e].shape, generator=torch.Generator().manual_seed(k)).to(DEVICE) >= p[k]
             for k, s, e in case.segments}
    args = (case.x, case.weight, case.bias, case.As, case.Bs, case.scalings, case.segments, p)
    expected = _grads(multi_lora_linear(*args, dropout_masks=masks), case.inputs, case.dtype)[0]
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()  # what comes back is not the tensor saved: the op must use it

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = multi_lora_linear(*args, dropout_masks=masks)
    bools = [t for t in packed if t.dtype == torch.bool]
    assert sorted(b.shape[0] for b in bools) == sorted((e - s) * SEQ for k, s, e in case.segments if p[k] > 0)
    got = _grads(y, case.inputs, case.dtype)[0]
    assert sum(t.dtype == torch.bool for t in unpacked) == len(bools)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_without_rng_states_the_segments_draw_from_the_global_rng_in_the_order_given():
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    p = [0.3, 0.2, 0.5]
    torch.manual_seed(3)
    y = multi_lora_linear(case.x, case.weight, case.bias, case.As, case.Bs, case.scalings, case.segments, p)
    torch.manual_seed(3)
    masks = {k: dropout_mask_like(case.x[s:e], p[k]) for k, s, e in case.segments}
    ref = multi_lora_linear_reference(case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
                                      case.segments, p, masks)
    assert_close(y, ref, torch.float32, "y")


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_draw_the_mask_of_the_unpadded_rows_and_keep_the_pads(impl):
    """Rows padded along dim 1: with lengths[k] shorter than x's, segment k's mask is the one the
    single op draws for x[start:end, :lengths[k]] from adapter k's RNG state (torch path: a bool
    mask; kernels: a seed, whose mask lora_dropout_mask rebuilds), padded with True; an adapter at
    full length (1) draws as without lengths, one of length 0 (2) keeps everything. Every output and
    gradient is the reference's on those masks."""
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7, seq=5)
    p, lengths = [0.3, 0.25, 0.5], {0: 2, 1: 5, 2: 0}
    states = {k: torch.Generator().manual_seed(30 + k).get_state() for k in range(3)}
    ref_masks = {}
    for k, start, end in case.segments:
        x_k = case.x.detach()[start:end]
        torch.manual_seed(30 + k)
        mask, seed = draw_dropout(x_k[:, :lengths[k]], p[k], None, None, fused=impl == "triton")
        if mask is None:
            mask = lora_dropout_mask(x_k[:, :lengths[k]].shape, p[k], seed, DEVICE)
        ref_masks[k] = torch.ones(x_k.shape, dtype=torch.bool, device=DEVICE)
        ref_masks[k][:, :lengths[k]] = mask
    assert not ref_masks[0][:, :2].all() and ref_masks[2].all()
    _check_against_reference(case, impl, p=p, ref_masks=ref_masks, rng_states=states, lengths=lengths)
    for k in range(3):  # each state advanced as the single op's draw advances the global one
        torch.manual_seed(30 + k)
        draw_dropout(case.x[:, :lengths[k]], p[k], None, None, fused=impl == "triton")
        assert torch.equal(states[k], torch.get_rng_state()), k


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_draw_each_segment_s_mask_from_its_seed_as_the_single_op_does(dtype):
    """The segmented kernels regenerate segment k's mask from seeds[k] with offsets counted from the
    segment's first row: the single-adapter kernels' mask for x = the segment's rows."""
    case = Case(**FIXED, dtype=dtype, needs=[True] * 7)
    p, seeds = [0.3, 0.25, 0.5], [101, 2**33 + 5, 7]
    _check_against_single_adapters(case, "triton", p, seeds=seeds)
    masks = {k: lora_dropout_mask(case.x[s:e].shape, p[k], seeds[k], DEVICE) for k, s, e in case.segments}
    _check_against_reference(case, "triton", p=p, seeds=seeds, ref_masks=masks)


@needs_triton
def test_the_kernels_mix_stored_masks_and_seeds():
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    p, seeds = [0.3, 0.25, 0.5], [1, 2, 3]
    start, end = case.rows_of(1)
    stored = torch.rand(case.x[start:end].shape, generator=torch.Generator().manual_seed(0)) >= p[1]
    stored = stored.to(DEVICE)
    masks = {1: stored, 0: None, 2: None}
    ref_masks = {1: stored, **{k: lora_dropout_mask(case.x[s:e].shape, p[k], seeds[k], DEVICE)
                               for k, s, e in case.segments if k != 1}}
    _check_against_reference(case, "triton", p=p, masks=masks, seeds=seeds, ref_masks=ref_masks)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_nf4_base_is_the_single_adapter_qlora_op_per_segment(impl):
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7, in_f=32, out_f=16)
    state = quantize_nf4(case.weight.float(), blocksize=64)
    y = run(impl, multi_lora_linear, case.x, state, case.bias, case.As, case.Bs, case.scalings, case.segments)
    got, g = _grads(y, case.inputs, case.dtype)
    for k, start, end in case.segments:
        x_k = case.x.detach()[start:end].clone().requires_grad_()
        A, B = (t.detach().clone().requires_grad_() for t in (case.As[k], case.Bs[k]))
        y_k = run(impl, nf4_lora_linear, x_k, state, case.bias, A, B, case.scalings[k])
        assert_close(y[start:end], y_k, torch.float32, f"y of adapter {k}")
        want = torch.autograd.grad(y_k, [x_k, A, B], g[start:end])
        assert_close(got[0][start:end], want[0], torch.float32, "dx")
        assert_close(got[1 + k], want[1], torch.float32, f"dA{k}")
        assert_close(got[4 + k], want[2], torch.float32, f"dB{k}")
    base_rows = [r for r in range(case.rows) if not any(s <= r < e for _, s, e in case.segments)]
    assert base_rows
    for r in base_rows:
        base = run(impl, nf4_lora_linear, case.x[r:r + 1].detach(), state, case.bias)
        assert_close(y[r:r + 1], base, torch.float32, f"base-only row {r}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_computes_in_bf16_and_gives_fp32_factors_fp32_gradients(impl):
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = run(impl, multi_lora_linear, case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
                case.segments)
    assert y.dtype == torch.bfloat16
    got, g = _grads(y, case.inputs, torch.bfloat16)
    for k, start, end in case.segments:
        x_k = case.x.detach()[start:end].clone().requires_grad_()
        A, B = (t.detach().clone().requires_grad_() for t in (case.As[k], case.Bs[k]))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y_k = run(impl, lora_linear, x_k, case.weight, case.bias, A, B, case.scalings[k])
        assert_close(y[start:end], y_k.float(), torch.bfloat16, f"y of adapter {k}")
        want = torch.autograd.grad(y_k, [x_k, A, B], g[start:end])
        for mine, theirs, name in zip((got[0][start:end], got[1 + k], got[4 + k]), want, ("x", "A", "B")):
            assert mine.dtype == torch.float32
            assert_close(mine, theirs, torch.bfloat16, f"d {name}{k}")


@pytest.mark.parametrize("mode", ["fp32", "native"])
def test_bf16_on_the_cpu_multiplies_as_lora_linear_does(force_cpu_low_precision, mode):
    """The CPU's bf16 matmuls in fp32 (no bf16 hardware) or natively: per segment what lora_linear
    gives in the same mode, outputs and gradients in bf16."""
    force_cpu_low_precision(mode)
    case = Case(**FIXED, dtype=torch.bfloat16, needs=[True] * 7)
    x = case.x.cpu().detach().requires_grad_()
    y = multi_lora_linear(x, case.weight.cpu(), case.bias.cpu(), [a.cpu() for a in case.As],
                          [b.cpu() for b in case.Bs], case.scalings, case.segments)
    assert y.dtype == torch.bfloat16
    g = randn(*y.shape, dtype=torch.bfloat16, seed=3).cpu()
    (dx,) = torch.autograd.grad(y, [x], g)
    assert dx.dtype == torch.bfloat16
    for k, start, end in case.segments:
        x_k = x.detach()[start:end].clone().requires_grad_()
        y_k = lora_linear(x_k, case.weight.cpu(), case.bias.cpu(), case.As[k].cpu().detach(),
                          case.Bs[k].cpu().detach(), case.scalings[k])
        assert_close(y[start:end], y_k.float(), torch.bfloat16, f"y of adapter {k}")
        (dx_k,) = torch.autograd.grad(y_k, [x_k], g[start:end])
        assert_close(dx[start:end], dx_k.float(), torch.bfloat16, f"dx of adapter {k}")


@pytest.mark.parametrize("impl", IMPLS)
def test_an_adapter_without_rows_gets_no_gradient_and_a_row_in_no_segment_gets_the_base(impl):
    case = Case(ranks=[2, 3], seg_rows=[0, 2], gaps=[1, 0, 1], dtype=torch.float32, needs=[True] * 5)
    y = run(impl, multi_lora_linear, case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
            case.segments)
    got, g = _grads(y, case.inputs, torch.float32)
    assert got[1] is None and got[3] is None  # adapter 0: zero rows
    assert got[2] is not None and got[4] is not None
    base = torch.nn.functional.linear(case.x.detach(), case.weight, case.bias)
    for row in (0, -1):
        assert_close(y[row], base[row], torch.float32, f"row {row}")
        assert_close(got[0][row], g[row] @ case.weight, torch.float32, f"dx of row {row}")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_without_segments_is_the_base(impl):
    case = Case(ranks=[2], seg_rows=[0], gaps=[2, 1], dtype=torch.float32, needs=[True] * 3)
    y = run(impl, multi_lora_linear, case.x, case.weight, case.bias, case.As, case.Bs, case.scalings, [])
    (dx,) = torch.autograd.grad(y, [case.x], torch.ones_like(y))
    assert_close(y, torch.nn.functional.linear(case.x.detach(), case.weight, case.bias), torch.float32, "y")
    assert_close(dx, torch.ones_like(y) @ case.weight, torch.float32, "dx")


@pytest.mark.parametrize("segments, message", [
    ([(0, 0, 3), (1, 2, 4)], "overlap"),
    ([(0, 0, 1), (0, 2, 3)], "two segments"),
    ([(2, 0, 1)], "names adapter 2"),
    ([(0, 3, 9)], "not within the 4 rows"),
])
def test_bad_segments_are_refused(segments, message):
    case = Case(ranks=[2, 3], seg_rows=[1, 1], gaps=[0, 1, 1], dtype=torch.float32, needs=[False] * 5)
    with pytest.raises(ValueError, match=message):
        multi_lora_linear(case.x, case.weight, case.bias, case.As, case.Bs, case.scalings, segments)


def test_a_trainable_base_is_refused():
    case = Case(ranks=[2], seg_rows=[1], gaps=[0, 0], dtype=torch.float32, needs=[False] * 3)
    with pytest.raises(ValueError, match="frozen"):
        multi_lora_linear(case.x, case.weight.requires_grad_(), None, case.As, case.Bs, [1.0], case.segments)


# ---------------------------------------------------------------------------------------
# Property tests: drawn segments, ranks, sizes and which inputs need gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@property_settings(max_examples=6)
@given(data=st.data())
def test_multi_lora_property_against_the_reference(impl, dtype, data):
    case = _draw_case(data, dtype)
    modes = ["off", "mask"] + (["seed"] if impl == "triton" else [])
    dropout = data.draw(st.sampled_from(modes), label="dropout")
    p = masks = seeds = ref_masks = None
    if dropout != "off":
        p = [data.draw(st.sampled_from([0.0, 0.2, 0.5])) for _ in range(case.K)]
    if dropout == "mask":
        masks = {k: torch.rand(case.x[s:e].shape, generator=torch.Generator().manual_seed(k)).to(DEVICE)
                 >= p[k] for k, s, e in case.segments}
    if dropout == "seed":
        seeds = [1000 + 7 * k for k in range(case.K)]
        ref_masks = {k: lora_dropout_mask(case.x[s:e].shape, p[k], seeds[k], DEVICE)
                     for k, s, e in case.segments}
    _check_against_reference(case, impl, p=p, masks=masks, seeds=seeds, ref_masks=ref_masks)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@property_settings(max_examples=4)
@given(data=st.data())
def test_multi_lora_property_against_single_adapter_ops(impl, dtype, data):
    """Drawn cases against K independent lora_linear calls, dropout from each adapter's RNG state."""
    case = _draw_case(data, dtype)
    p = [data.draw(st.sampled_from([0.0, 0.3])) for _ in range(case.K)]
    _check_against_single_adapters(case, impl, p, rng_seeds=[40 + k for k in range(case.K)])


def test_the_reference_backend_runs_the_reference():
    case = Case(**FIXED, dtype=torch.float32, needs=[True] * 7)
    with backend("reference"):
        y = multi_lora_linear(case.x, case.weight, case.bias, case.As, case.Bs, case.scalings, case.segments)
    assert y.grad_fn is not None and "MultiLoRA" not in type(y.grad_fn).__name__
    ref = multi_lora_linear_reference(case.x, case.weight, case.bias, case.As, case.Bs, case.scalings,
                                      case.segments)
    assert torch.equal(y, ref)
