"""4-bit NormalFloat (NF4) weights for QLoRA, written from scratch (no bitsandbytes at run time).

    layer = NF4Linear.from_linear(linear)                 # one frozen Linear -> 4 bits a weight
    quantize_model(model)                                 # every Linear but the output head
    model = load_pretrained(path, dtype="bf16", quantization="nf4")   # quantised as it streams in
    inject_lora(model, config)                            # QLoRA: LoRA on top of the 4-bit base

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3. A weight is cut into
blocks of 64 consecutive elements (row-major); each block keeps its absolute maximum (fp32) and
each element the index of the nearest of the 16 NF4 values (``kernels/nf4.py: NF4_CODE``) to
``w / absmax``, two indices a byte. Double quantisation stores the absmax values themselves in 8
bits: minus their mean, blockwise (256) with bitsandbytes' signed dynamic map. The layout, the
rounding and the tie-breaking are bitsandbytes' reference quantiser's (``quantize_4bit`` with
``quant_type="nf4"``, ``compress_statistics``), and ``tests/test_nf4.py`` compares the two bit for
bit when bitsandbytes is installed.

Memory per weight: 4 bits + 32/64 (absmax) = 4.5 bits; double-quantised 4 + 8/64 + 32/(64·256)
≈ 4.127 bits, i.e. 0.258 of bf16 (``NF4Linear.nbytes`` counts what is really held).

``NF4Linear`` keeps the 4-bit tensors as frozen ``nn.Parameter``s (uint8 and fp32), so
``model.to(device)`` moves them and FSDP2 shards them like any weight (its all-gather handles
mixed dtypes as bytes). A dtype cast (``model.half()``, ``model.to(torch.bfloat16)``) leaves them
alone: the fp32 scales are part of the format. Its forward pass dequantises the weight to the
compute dtype and drops it after the matmul; the backward pass dequantises it again
(``kernels.nf4_lora_linear``), so no layer's dequantised weight outlives its own op.
"""

from __future__ import annotations

import torch
from torch import nn

from peftloop.kernels import nf4_dequantize, nf4_lora_linear
from peftloop.kernels.nf4 import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4State,
    check_state,
    dynamic_code,
    nf4_code,
)
from peftloop.modules import adapter_internals, matches, output_head_names, replace_module

QUANTIZATION_METHODS = ("nf4",)
# Elements quantised at a time: bounds the temporaries (a few fp32 copies of a chunk) to ~1 MB
# each, whatever the weight's size (an 11008 x 4096 projection is 180 MB in fp32).
CHUNK_ELEMENTS = 1 << 18
NF4_ZERO_INDEX = NF4_CODE.index(0.0)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def quantize_blockwise(values: torch.Tensor, code: torch.Tensor,
                       blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices uint8, absmax fp32 per block) of a flat tensor against a sorted ``code``:
    each element becomes the index of the nearest code value to ``x / absmax`` (ties to the
    lower one). bitsandbytes' reference arithmetic: full blocks multiply by ``1 / absmax``, a
    short last block divides by its absmax, an all-zero block keeps absmax 0 (its elements
    map to the code's 0)."""
    values = values.reshape(-1)
    n = values.numel()
    full = n - n % blocksize
    bounds = _midpoints(code)
    out = torch.empty(n, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=values.device)
    step = max(blocksize, CHUNK_ELEMENTS // blocksize * blocksize)
    for start in range(0, full, step):
        block = values[start:min(start + step, full)].float().view(-1, blocksize)
        peak = block.abs().amax(dim=1)
        absmax[start // blocksize:start // blocksize + peak.numel()] = peak
        scaled = (block * (1.0 / peak.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        out[start:start + block.numel()] = torch.bucketize(scaled.view(-1), bounds,
                                                           out_int32=True).to(torch.uint8)
    if full < n:
        tail = values[full:].float()
        peak = tail.abs().amax()
        absmax[-1] = peak
        scaled = (tail / peak.clamp(min=1e-38)).clamp_(-1, 1)
        out[full:] = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return out, absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 name: str = "weight") -> NF4State:
    """Quantise ``weight`` (any float dtype, any device; computed in fp32) to NF4.

    ``double_quant`` stores the block scales in 8 bits (QLoRA's double quantisation).
    ``name`` only labels errors (the module path)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: NF4 blocksize {blocksize} is not one of {BLOCKSIZES}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: cannot quantise a {weight.dtype} tensor to NF4")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: the weight has NaN/inf values; NF4 cannot represent them")
    weight = weight.detach()
    n = weight.numel()
    codes, absmax = quantize_blockwise(weight, nf4_code(weight.device), blocksize)
    if n % 2:  # the last byte's low nibble: index 7, NF4's 0.0 (bitsandbytes pads the same way)
        codes = torch.cat([codes, codes.new_tensor([NF4_ZERO_INDEX])])
    packed = (codes[0::2] << 4) | codes[1::2]
    nested_absmax = nested_offset = None
    if double_quant:
        nested_offset = absmax.mean().reshape(1)
        absmax, nested_absmax = quantize_blockwise(absmax - nested_offset, dynamic_code(weight.device),
                                                   NESTED_BLOCKSIZE)
    return NF4State(packed, absmax, nested_absmax, nested_offset, weight.shape, blocksize)


_FP32_STATE = ("absmax", "nested_absmax", "nested_offset")


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is held in NF4; the bias (if any) stays in its dtype.

    ``forward`` is ``x·dequant(W)ᵀ + b`` in x's dtype (the autocast dtype under autocast). The
    tensors: ``packed_weight`` (uint8, two codes a byte), ``absmax`` (fp32 per block, or uint8
    when double-quantised, with ``nested_absmax`` and ``nested_offset``). ``weight_dtype`` is the
    dtype the weight had: ``dequantize()`` and merging give it back in that dtype by default.
    """

    def __init__(self, state: NF4State, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32, name: str = ""):
        super().__init__()
        check_state(state)
        if len(state.shape) != 2:
            raise ValueError(f"{name or 'NF4Linear'}: a Linear weight is 2-D, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        self.weight_dtype = weight_dtype
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"{name or 'NF4Linear'}: bias shape {tuple(bias.shape)} does not fit "
                             f"{self.out_features} outputs")
        tensors = {"packed_weight": state.packed, "absmax": state.absmax,
                   "nested_absmax": state.nested_absmax, "nested_offset": state.nested_offset,
                   "bias": None if bias is None else bias.detach()}
        for key, tensor in tensors.items():  # None entries are registered too (absent, like nn.Linear's bias)
            self.register_parameter(key, None if tensor is None
                                    else nn.Parameter(tensor, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    name: str = "") -> NF4Linear:
        """Quantise ``linear`` (its weight is read once; the caller may drop the Linear after)."""
        state = quantize_nf4(linear.weight, blocksize, double_quant, name=f"{name or 'Linear'}.weight")
        return cls(state, linear.bias, linear.weight.dtype, name=name)

    @property
    def state(self) -> NF4State:
        return NF4State(self.packed_weight, self.absmax, self.nested_absmax, self.nested_offset,
                        torch.Size((self.out_features, self.in_features)), self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised weight (packed codes and scales; not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.packed_weight, self.absmax, self.nested_absmax,
                                                          self.nested_offset) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_lora_linear(x, self.state, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default ``weight_dtype``), a fresh tensor."""
        return nf4_dequantize(self.state, dtype or self.weight_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the dequantised weight (and the bias) in ``dtype``."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return linear

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` (this layer's shape) into this layer in place, with its block size
        and double quantisation (PiSSA/OLoRA replace W by a residual this way)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"requantize_: weight {tuple(weight.shape)} != "
                             f"{(self.out_features, self.in_features)}")
        state = quantize_nf4(weight.to(self.packed_weight.device), self.blocksize, self.double_quant)
        for name, tensor in zip(("packed_weight", "absmax", "nested_absmax", "nested_offset"), state):
            if tensor is not None:
                self._parameters[name].data = tensor

    def _apply(self, fn, recurse=True):
        # model.half() / model.to(torch.bfloat16) must not round the fp32 scales (they are part of
        # the format, like the uint8 codes that a cast leaves alone anyway): moves apply, casts not.
        before = {name: self._parameters[name].data for name in _FP32_STATE
                  if self._parameters[name] is not None}
        super()._apply(fn, recurse)
        for name, data in before.items():
            param = self._parameters[name]
            if param.dtype != data.dtype:
                param.data = data.to(param.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"weight_dtype={str(self.weight_dtype).removeprefix('torch.')}")


def quantizable_linears(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_model`` converts: all but the output head
    (kept in full precision, as QLoRA and bitsandbytes' ``llm_int8_skip_modules`` do), ``skip``
    (exact names or '.'-suffixes) and the adapters' own layers (lora_A, lora_B, trained copies);
    the frozen ``base_layer`` of a LoRA layer is quantised."""
    heads = output_head_names(model)
    adapters = {name for name in adapter_internals(model) if not name.endswith(".base_layer")}
    in_head = lambda name: any(name == h or name.startswith(h + ".") for h in heads)  # noqa: E731
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not in_head(name) and name not in adapters
            and not matches(name, list(skip))]


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   skip: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Replace every Linear but the output head (and ``skip``) by an ``NF4Linear``, in place.

    Each weight is quantised and dropped before the next, so the peak is the model plus one
    layer's fp32 temporaries. To load a checkpoint straight into 4 bits without ever holding
    it in full precision, use ``load_pretrained(..., quantization="nf4")``."""
    for name in quantizable_linears(model, skip):
        replace_module(model, name,
                       NF4Linear.from_linear(model.get_submodule(name), blocksize, double_quant, name=name))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``NF4Linear`` by a plain ``nn.Linear`` (in ``dtype``, default each layer's
    ``weight_dtype``), in place. The values are dequant(W4), not the weights before quantisation."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            replace_module(model, name, module.to_linear(dtype))
    return model


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
