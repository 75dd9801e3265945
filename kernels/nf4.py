"""NF4: dequantise a 4-bit NormalFloat weight, and the linear layer (with LoRA) on top of it.

A weight W ``[out, in]`` quantised to NF4 (Dettmers et al. 2023, "QLoRA", §3) is held as

    packed   uint8 [ceil(numel/2)]   two 4-bit code indices per byte, the first element in the high nibble
    absmax   fp32  [n_blocks]        max |W| of each block of ``blocksize`` consecutive elements (row-major)
             or, double-quantised:
    absmax   uint8 [n_blocks]        absmax - offset, 8-bit blockwise with the signed dynamic map,
    nested_absmax fp32 [ceil(n_blocks/256)]   the absmax of each block of 256 of those,
    nested_offset fp32 [1]           the mean of the original absmax values

    W[i] = NF4_CODE[code(i)] · absmax[i // blocksize]
    absmax[b] = DYNAMIC_CODE[q(b)] · nested_absmax[b // 256] + nested_offset      (double-quantised)

exactly as bitsandbytes stores ``quant_type="nf4"`` (``compress_statistics=True`` for the second
form): the code values, the nibble order, the rounding of each product (fp32, then cast) are
theirs. Quantising lives in ``peftloop/nf4.py``; this file only reads the format.

Ops and implementations (see ``_dispatch``):

- ``nf4_dequantize(state, dtype)``: W in ``dtype``.
  ``nf4_dequantize_reference`` is the formula above, element by element; the torch path looks
  both nibbles of a byte up at once in a 256-entry table; the Triton kernel decodes one byte per
  lane (both its elements lie in one block), the double-quantised absmax included.
- ``nf4_lora_linear(x, state, bias, lora_A, lora_B, scaling, ...)``: ``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``
  with W the dequantised weight (no LoRA: ``lora_A = lora_B = None``). ``NF4LinearFunction``
  dequantises W in the forward pass, uses it and drops it; the backward pass dequantises it
  again for dx. The dequantised weight is never saved, so a model holds at most one layer's
  dequantised weight at a time, forward or backward (QLoRA's memory claim). On CUDA the matmuls
  are the fused LoRA kernels of ``lora_linear.py`` on the dequantised weight.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import backend_for, interpreting
from ._triton_utils import cast, new_output, tl, triton
from .lora_linear import (
    LoRANeeds,
    cast_all,
    check_dropout,
    compute_dtype,
    draw_dropout,
    log_fallback,
    lora_backward,
    lora_backward_triton,
    lora_forward,
    lora_forward_triton,
    lora_linear_reference,
    triton_ineligible,
)

# The 16 NF4 values: quantiles of N(0, 1) (8 negative, 0, 7 positive, plus ±1 at the ends),
# normalised to [-1, 1]. bitsandbytes functional.get_4bit_type("nf4"), from
# create_normal_map(offset=0.9677083, use_extra_value=True), fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256  # double quantisation: one fp32 scale per 256 absmax values (QLoRA §3)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dynamic_code_values(max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map(signed=True)``, Dettmers
    2016, "8-Bit Approximations for Parallelism in Deep Learning"): for each exponent e = 10^-6 ...
    10^0, 2^i evenly spaced mantissas in (0.1, 1] (means of linspace(0.1, 1) bins), both signs,
    plus 0 and 1; sorted, 256 values. Computed in fp32 as bitsandbytes does."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2**total_bits
    return sorted(data)


@functools.cache
def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values, fp32, on ``device`` (one copy per device)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def dynamic_code(device: torch.device) -> torch.Tensor:
    """The 256-value signed dynamic map, fp32, on ``device``."""
    return torch.tensor(dynamic_code_values(), dtype=torch.float32, device=device)


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: (NF4 value of the high nibble, NF4 value of the low nibble) of each byte."""
    code = nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)


class NF4State(NamedTuple):
    """One NF4 weight: the tensors (on one device) and its shape. See the module docstring."""

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_offset: torch.Tensor | None
    shape: torch.Size
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check_state(state: NF4State) -> None:
    """Refuse a state whose tensors do not fit its shape and block size (names what is off)."""
    n = state.numel
    blocks = -(-n // state.blocksize)
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4: blocksize {state.blocksize} is not one of {BLOCKSIZES}")
    if state.packed.dtype != torch.uint8 or state.packed.numel() != (n + 1) // 2:
        raise ValueError(f"NF4: packed is {state.packed.dtype} with {state.packed.numel()} elements; "
                         f"a {tuple(state.shape)} weight needs uint8 with {(n + 1) // 2}")
    want = torch.uint8 if state.double_quant else torch.float32
    if state.absmax.dtype != want or state.absmax.numel() != blocks:
        raise ValueError(f"NF4: absmax is {state.absmax.dtype} with {state.absmax.numel()} elements; "
                         f"expected {want} with {blocks} (blocks of {state.blocksize})")
    if state.double_quant:
        nested = -(-blocks // NESTED_BLOCKSIZE)
        offset = state.nested_offset
        if state.nested_absmax.numel() != nested or offset is None or offset.numel() != 1:
            raise ValueError(f"NF4: nested_absmax has {state.nested_absmax.numel()} elements "
                             f"(expected {nested}) "
                             "or nested_offset is not one value")


# ---------------------------------------------------------------------------------------
# Dequantisation: reference, torch path, Triton kernel.
# ---------------------------------------------------------------------------------------


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] · scales[i // blocksize], fp32, for a flat ``values`` (the last block may be short)."""
    return values * scales.repeat_interleave(blocksize)[: values.numel()]


def absmax_reference(state: NF4State) -> torch.Tensor:
    """The fp32 absmax of every block (decoding the double quantisation: two roundings, as bitsandbytes)."""
    if not state.double_quant:
        return state.absmax
    decoded = _blockwise(dynamic_code(state.absmax.device)[state.absmax.long()], state.nested_absmax,
                         NESTED_BLOCKSIZE)
    return decoded + state.nested_offset


def nf4_dequantize_reference(state: NF4State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition of correct: ``NF4_CODE[code(i)] · absmax[i // blocksize]`` in fp32, cast to
    ``dtype``."""
    codes = torch.stack((state.packed >> 4, state.packed & 0xF), dim=-1).reshape(-1)[: state.numel]
    values = nf4_code(state.packed.device)[codes.long()]
    return _blockwise(values, absmax_reference(state), state.blocksize).reshape(state.shape).to(dtype)


def nf4_dequantize_torch(state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """The CPU path: one gather of both nibbles per byte, one blockwise multiply (fp32), one cast."""
    n, bs = state.numel, state.blocksize
    absmax = absmax_reference(state)
    values = _byte_table(state.packed.device).index_select(0, state.packed.int()).view(-1)
    full = n // bs * bs
    out = new_output(n, dtype, state.packed.device)
    head = out[:full].view(-1, bs)
    if dtype == torch.float32:
        torch.mul(values[:full].view(-1, bs), absmax[: full // bs, None], out=head)
    else:
        head.copy_(values[:full].view(-1, bs) * absmax[: full // bs, None])  # fp32 products, one rounding
    if full < n:
        out[full:] = values[full:n] * absmax[-1]
    return out.view(state.shape)


# Bytes per program: 1024 bytes = 2048 elements, 4 warps x 32 lanes x 8 bytes (a memory-bound
# op; Unsloth's and bitsandbytes' dequantisers use the same order of work per block). Under the
# interpreter, 128 bytes make the small test shapes span several programs with a ragged tail.
BLOCK_GPU = 1024
BLOCK_INTERPRETER = 128
NUM_WARPS = 4


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_offset_ptr, code_ptr,
                        nested_code_ptr, out_ptr, n_elements, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                        NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [2·BLOCK·pid, 2·BLOCK·(pid+1)) of W: each lane decodes one byte (two elements,
    in one quantisation block since BLOCKSIZE is even) and the pair is stored interleaved."""
    pid = tl.program_id(0).to(tl.int64)
    byte_index = pid * BLOCK + tl.arange(0, BLOCK)
    in_bounds = byte_index < (n_elements + 1) // 2
    byte = tl.load(packed_ptr + byte_index, mask=in_bounds, other=0).to(tl.int32)
    block = byte_index * 2 // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=in_bounds, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE,
                                                       mask=in_bounds, other=0.0)
        scale = scale + tl.load(nested_offset_ptr)  # a separate rounding (the launch disables fma fusion)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_bounds, other=0.0)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 0xF)) * scale
    values = cast(tl.interleave(high, low), out_ptr.dtype.element_ty)
    element = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + element, values, mask=element < n_elements)


def nf4_dequantize_triton(state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    device = state.packed.device
    n = state.numel
    out = new_output(state.shape, dtype, device)
    if n == 0:
        return out
    block = BLOCK_INTERPRETER if interpreting() else BLOCK_GPU
    nested = state.double_quant
    _nf4_dequant_kernel[(triton.cdiv((n + 1) // 2, block),)](
        state.packed, state.absmax, state.nested_absmax if nested else state.absmax,
        state.nested_offset if nested else state.absmax, nf4_code(device), dynamic_code(device), out, n,
        BLOCKSIZE=state.blocksize, NESTED=nested, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, BLOCK=block,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def _dequantize(state: NF4State, dtype: torch.dtype, impl: str) -> torch.Tensor:
    if impl == "triton":
        return nf4_dequantize_triton(state, dtype)
    if impl == "torch":
        return nf4_dequantize_torch(state, dtype)
    return nf4_dequantize_reference(state, dtype)


def nf4_dequantize(state: NF4State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W in ``dtype``, dispatched by ``backend_for(state.packed)``: Triton on CUDA, torch on the CPU."""
    return _dequantize(state, dtype, backend_for(state.packed))


# ---------------------------------------------------------------------------------------
# The linear layer (NF4 base, optional LoRA).
# ---------------------------------------------------------------------------------------


def nf4_lora_linear_reference(x, state, bias=None, lora_A=None, lora_B=None, scaling=1.0, dropout_p=0.0,
                              dropout_mask=None):
    """The definition of correct: the dequantised weight, then ``lora_linear_reference`` (or F.linear)."""
    weight = nf4_dequantize_reference(state, x.dtype)
    if lora_A is None:
        return F.linear(x, weight, bias)
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask)


class NF4LinearFunction(torch.autograd.Function):
    r"""``y = x·Wᵀ + b + s·u·Bᵀ``, ``u = x_d·Aᵀ``, W = dequant(state) frozen; the LoRA terms
    are absent when A and B are None.

    The arithmetic is ``lora_linear``'s (``lora_forward``/``lora_backward``, or their Triton
    twins when ``fused``) on the dequantised W; see ``LoRALinearFunction`` for the backward
    pass. What differs is what is kept between the passes: W is dequantised to x's dtype in
    the forward pass, used, and dropped; the backward pass dequantises it again, only when x
    needs a gradient. Saved: x (only when A needs a gradient), u = x_d·Aᵀ ([N, r]), the
    dropout mask (bool) and the NF4 state (the frozen 4-bit tensors themselves, as
    ``ctx.state``: no copy, never the dequantised weight).
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, state, scaling, dropout_p, dropout_mask, seed, impl, fused):
        x2 = x.reshape(-1, x.shape[-1])
        mask2 = None if dropout_mask is None else dropout_mask.reshape(x2.shape)
        # Dequantised into x's dtype: the weight is rounded to bf16 exactly as on a GPU.
        weight = _dequantize(state, x.dtype, impl)
        forward = lora_forward_triton if fused else lora_forward
        y, u = forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, mask2, seed)
        del weight
        _need_x, _bias, need_A, *_ = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need_A else None, lora_A, lora_B, u, mask2)
        ctx.state, ctx.impl, ctx.fused, ctx.dtype = state, impl, fused, x.dtype
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape = scaling, dropout_p, seed, x.shape
        return y.reshape(*x.shape[:-1], state.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, lora_A, lora_B, u, mask2 = ctx.saved_tensors
        need_x, _bias, need_A, need_B, *_ = ctx.needs_input_grad
        g = grad_y.reshape(-1, ctx.state.shape[0])
        weight = _dequantize(ctx.state, ctx.dtype, ctx.impl) if need_x else None
        backward = lora_backward_triton if ctx.fused else lora_backward
        dx, dA, dB = backward(g, x2, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, mask2, ctx.seed,
                              LoRANeeds(need_x, need_A, need_B))
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        return dx, None, dA, dB, None, None, None, None, None, None, None


def nf4_lora_linear(x, state: NF4State, bias=None, lora_A=None, lora_B=None, scaling: float = 1.0,
                    dropout_p: float = 0.0, dropout_mask=None, seed=None):
    """``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with W the NF4 weight ``state`` (frozen, like b).

    Without ``lora_A``/``lora_B`` it is the plain 4-bit linear layer ``x·Wᵀ + b``. Dtypes as
    ``lora_linear``: the op computes in ``compute_dtype(x)`` (autocast's when it is on, else
    x's), casting x, b, A and B to it itself (differentiably, on every backend) and
    dequantising W into it. Dropout as in ``lora_linear``: a ``dropout_mask`` (bool, x's
    shape) fixes the mask; otherwise the Triton path draws it from ``seed`` in the kernels and
    the torch path from torch's RNG.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("nf4_lora_linear: the bias of a 4-bit layer must be frozen (requires_grad=False)")
    if x.shape[-1] != state.shape[1]:
        raise ValueError(f"nf4_lora_linear: x has {x.shape[-1]} features, the weight {tuple(state.shape)} "
                         f"takes {state.shape[1]}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4_lora_linear: pass both lora_A and lora_B, or neither")
    check_dropout("nf4_lora_linear", x, dropout_p, None if lora_A is None else dropout_mask)
    if lora_A is None:  # no LoRA branch: nothing to drop
        dropout_p = 0.0
    dtype = compute_dtype(x)
    x, bias, lora_A, lora_B = cast_all(dtype, x, bias, lora_A, lora_B)
    impl = backend_for(x)
    # The matmuls: lora_linear's fused kernels on the dequantised weight (Triton), else torch's.
    fused = impl == "triton" and lora_A is not None
    if fused:
        reason = triton_ineligible(dtype, lora_A.shape[0])
        if reason is not None:
            log_fallback(reason)
            fused = False
    dropout_mask, seed = draw_dropout(x, dropout_p, dropout_mask, seed, fused)
    with torch.autocast(x.device.type, enabled=False):
        if impl == "reference":
            return nf4_lora_linear_reference(x, state, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask)
        return NF4LinearFunction.apply(x, bias, lora_A, lora_B, state, scaling, dropout_p, dropout_mask, seed,
                                       impl, fused)
