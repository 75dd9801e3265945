"""Compile every Triton kernel of this package for CUDA GPUs on a machine without one.

    python -m peftloop.kernels._aot [--targets 80,90] [--dtypes bf16,fp32] [--json PATH]

Triton lowers a kernel to PTX and a cubin for a ``GPUTarget`` with no driver present (the
wheel ships ptxas). That proves each kernel builds for real hardware, which the interpreter
never does (it runs the Python body), and it gives the shared memory each config needs:
a launch over the device's limit compiles fine and fails only on the GPU.

Each kernel is compiled with the arguments its launcher passes for a Llama-8B-like layer
(4,096 tokens, hidden 4,096, intermediate 14,336, 32/8 heads of 128, vocabulary 128,256,
LoRA rank 16), specialised the way Triton's runtime JIT specialises them (sizes divisible
by 16 and 16-byte-aligned pointers get the divisibility hint, unit strides become
constants). For an autotuned kernel, the configs that the shared-memory bound keeps for
the target (as ``_triton_utils.autotune`` prunes at run time) are compiled; each one's real
shared memory must fit the target and stay under the bound. The quick selection (the
default, ~30 s: what the test runs) compiles, per kernel variant, dtype and target, the
kept config with the largest bound; ``--all`` compiles every variant and every kept config
(~3 min on 2 cores).

``TRITON_INTERPRET`` must be unset: the interpreter replaces ``@triton.jit`` functions with
Python. The test (tests/kernels/test_compile_cuda.py) runs this module in a subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from ._triton_utils import SHARED_MEMORY_LIMIT, prune_configs

# The op modules (``from . import lora_linear`` would give the function of that name, which
# the package re-exports over its module attribute).
linear_cross_entropy, lora_linear, multi_lora, nf4, rms_norm, rope, swiglu = (
    importlib.import_module(f"{__package__}.{name}")
    for name in ("linear_cross_entropy", "lora_linear", "multi_lora", "nf4", "rms_norm", "rope", "swiglu")
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The Llama-8B-like layer the launch arguments describe.
TOKENS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 4096, 14336, 32, 8, 128
VOCAB, RANK = 128256, 16


@dataclass
class Launch:
    """One kernel launch as its launcher makes it."""

    kernel: str  # a readable name: "<op>.<kernel>[variant]"
    fn: object  # the JITFunction or the Autotuner around it
    args: dict  # every runtime argument by name (tensors stand for their dtype and alignment)
    constexprs: dict  # constexpr arguments the launcher passes
    options: list = field(default_factory=lambda: [{"num_warps": 4, "num_stages": 3}])
    shared_bytes: object = None  # bound used by the autotuner's pruning, for autotuned kernels
    quick: bool = True  # part of the quick selection (the test's); --all compiles every launch


def _t(dtype) -> torch.Tensor:
    return torch.empty(64, dtype=dtype)  # 64-byte aligned: what the allocator gives on a GPU too


def launches(dtype: torch.dtype) -> list[Launch]:
    f32 = torch.float32
    es = []
    # swiglu: [tokens, intermediate]
    cols = INTERMEDIATE
    es.append(Launch("swiglu._swiglu_fwd_kernel", swiglu._swiglu_fwd_kernel,
                     dict(gate_ptr=_t(dtype), up_ptr=_t(dtype), out_ptr=_t(dtype), n_cols=cols,
                          stride_gate=cols, stride_up=cols, stride_out=cols),
                     dict(BLOCK=swiglu.BLOCK_GPU), [{"num_warps": swiglu.NUM_WARPS, "num_stages": 3}]))
    es.append(Launch("swiglu._swiglu_bwd_kernel", swiglu._swiglu_bwd_kernel,
                     dict(grad_ptr=_t(dtype), gate_ptr=_t(dtype), up_ptr=_t(dtype), dgate_ptr=_t(dtype),
                          dup_ptr=_t(dtype), n_cols=cols, stride_grad=cols, stride_gate=cols, stride_up=cols,
                          stride_dgate=cols, stride_dup=cols),
                     dict(BLOCK=swiglu.BLOCK_GPU), [{"num_warps": swiglu.NUM_WARPS, "num_stages": 3}]))
    # rms_norm: [tokens, hidden]
    block_h = 4096
    warps = rms_norm._num_warps(block_h)
    es.append(Launch("rms_norm._rms_norm_fwd_kernel", rms_norm._rms_norm_fwd_kernel,
                     dict(x_ptr=_t(dtype), w_ptr=_t(dtype), y_ptr=_t(dtype), rstd_ptr=_t(f32), n_cols=HIDDEN,
                          stride_x=HIDDEN, stride_y=HIDDEN, eps=1e-5),
                     dict(BLOCK_H=block_h), [{"num_warps": warps, "num_stages": 3}]))
    es.append(Launch("rms_norm._rms_norm_bwd_kernel", rms_norm._rms_norm_bwd_kernel,
                     dict(dy_ptr=_t(dtype), x_ptr=_t(dtype), w_ptr=_t(dtype), rstd_ptr=_t(f32),
                          dx_ptr=_t(dtype), dw_partial_ptr=_t(f32), n_rows=TOKENS, n_cols=HIDDEN,
                          rows_per_program=13,
                          stride_dy=HIDDEN, stride_x=HIDDEN, stride_dx=HIDDEN),
                     dict(BLOCK_H=block_h, HAS_DW=True), [{"num_warps": warps, "num_stages": 3}]))
    # rope: q viewed [B, H, T, D] from a contiguous [B, T, H, D]; cos/sin [B, T, D]
    for backward in (False, True):
        es.append(Launch(f"rope._rope_kernel[{'bwd' if backward else 'fwd'}]", rope._rope_kernel,
                         dict(x_ptr=_t(dtype), out_ptr=_t(dtype), cos_ptr=_t(dtype), sin_ptr=_t(dtype),
                              seq_len=TOKENS, n_heads=HEADS, half=HEAD_DIM // 2,
                              sx_b=TOKENS * HEADS * HEAD_DIM, sx_h=HEAD_DIM, sx_t=HEADS * HEAD_DIM, sx_d=1,
                              so_b=TOKENS * HEADS * HEAD_DIM, so_h=HEAD_DIM, so_t=HEADS * HEAD_DIM, so_d=1,
                              sc_b=TOKENS * HEAD_DIM, sc_t=HEAD_DIM, sc_d=1, ss_b=TOKENS * HEAD_DIM,
                              ss_t=HEAD_DIM, ss_d=1),
                         dict(BACKWARD=backward, BLOCK_HEADS=rope.BLOCK_HEADS_GPU, BLOCK_HALF=HEAD_DIM // 2)))
    # fused linear cross-entropy: one chunk of logits [rows, vocab]
    es.append(Launch("linear_cross_entropy._ce_chunk_kernel", linear_cross_entropy._ce_chunk_kernel,
                     dict(logits_ptr=_t(dtype), labels_ptr=_t(torch.int64), loss_ptr=_t(f32),
                          stride_logits=VOCAB, vocab=VOCAB, ignore_index=-100, label_smoothing=0.1),
                     dict(WRITE_GRAD=True, BLOCK_V=linear_cross_entropy.BLOCK_V_GPU),
                     [{"num_warps": 8, "num_stages": 3}]))
    # LoRA: gate_proj of the layer, x [tokens, hidden], W [intermediate, hidden]
    M, K, N, R = TOKENS, HIDDEN, INTERMEDIATE, RANK
    block_r = lora_linear._rank_block(R)
    common = dict(BLOCK_R=block_r, PRECISION="ieee")
    # The quick selection keeps the stored-mask variant (the most shared memory: it adds a
    # byte tile) in both dtypes and the seed variant (philox in the loop) in bf16.
    Dropout = lora_linear.Dropout
    variants = ((Dropout.FROM_SEED, "seed", dtype != torch.float32), (Dropout.FROM_MASK, "mask", True),
                (Dropout.OFF, "no dropout", False))
    for mode, name, quick in variants:
        mask = _t(torch.uint8) if mode == Dropout.FROM_MASK else None
        smm, smk = (K, 1) if mode == Dropout.FROM_MASK else (0, 0)
        es.append(Launch(f"lora_linear._lora_fwd_kernel[{name}]", lora_linear._lora_fwd_kernel,
                         dict(x_ptr=_t(dtype), w_ptr=_t(dtype), bias_ptr=_t(dtype), a_ptr=_t(dtype),
                              b_ptr=_t(dtype), mask_ptr=mask, y_ptr=_t(dtype), u_ptr=_t(dtype),
                              M=M, N=N, K=K, R=R,
                              stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1,
                              stride_bn=R, stride_br=1, stride_mm=smm, stride_mk=smk, stride_ym=N,
                              stride_yn=1, stride_um=R, stride_ur=1, scaling=2.0, dropout_p=0.1,
                              keep_scale=1 / 0.9, seed=12345),
                         dict(HAS_BIAS=True, DROPOUT=int(mode), **common),
                         shared_bytes=lora_linear._mm_shared_bytes, quick=quick))
        es.append(Launch(f"lora_linear._lora_dx_kernel[{name}]", lora_linear._lora_dx_kernel,
                         dict(x_ptr=_t(dtype), w_ptr=_t(dtype), a_ptr=_t(dtype), b_ptr=_t(dtype),
                              mask_ptr=mask, dx_ptr=_t(dtype), gb_ptr=_t(dtype), M=M, N=K, K=N, R=R,
                              stride_gm=N, stride_gk=1, stride_wk=K, stride_wn=1, stride_ar=K, stride_an=1,
                              stride_bk=R, stride_br=1, stride_mm=smm, stride_mn=smk, stride_dm=K,
                              stride_dn=1, stride_gbm=R, stride_gbr=1, scaling=2.0, dropout_p=0.1,
                              keep_scale=1 / 0.9, seed=12345),
                         dict(HAS_DX=True, DROPOUT=int(mode), **common),
                         shared_bytes=lora_linear._mm_shared_bytes, quick=quick))
        es.append(Launch(f"lora_linear._lora_da_kernel[{name}]", lora_linear._lora_da_kernel,
                         dict(gb_ptr=_t(dtype), x_ptr=_t(dtype), mask_ptr=mask, da_ptr=_t(f32), M=M, K=K, R=R,
                              rows_per_split=512, stride_gbm=R, stride_gbr=1, stride_xm=K, stride_xk=1,
                              stride_mm=smm, stride_mk=smk, dropout_p=0.1, keep_scale=1 / 0.9, seed=12345),
                         dict(DROPOUT=int(mode), **common), shared_bytes=lora_linear._da_shared_bytes,
                         quick=quick))
    es.append(Launch("lora_linear._dropout_mask_kernel", lora_linear._dropout_mask_kernel,
                     dict(mask_ptr=_t(torch.uint8), M=M, K=K, seed=12345, dropout_p=0.1),
                     dict(BLOCK_M=32, BLOCK_K=32)))
    # NF4 dequantisation of the same gate_proj weight [intermediate, hidden], into the compute dtype;
    # launched as nf4_dequantize_triton launches it (no fma fusion: the scales round as torch's).
    for nested in (True, False):
        es.append(Launch(f"nf4._nf4_dequant_kernel[{'double_quant' if nested else 'fp32_absmax'}]",
                         nf4._nf4_dequant_kernel,
                         dict(packed_ptr=_t(torch.uint8), absmax_ptr=_t(torch.uint8 if nested else f32),
                              nested_absmax_ptr=_t(f32), nested_offset_ptr=_t(f32), code_ptr=_t(f32),
                              nested_code_ptr=_t(f32), out_ptr=_t(dtype), n_elements=N * K),
                         dict(BLOCKSIZE=64, NESTED=nested, NESTED_BLOCKSIZE=nf4.NESTED_BLOCKSIZE,
                              BLOCK=nf4.BLOCK_GPU),
                         [{"num_warps": nf4.NUM_WARPS, "num_stages": 3, "enable_fp_fusion": False}]))
    return es + multi_lora_launches(dtype)


def multi_lora_launches(dtype: torch.dtype) -> list[Launch]:
    """The segmented (many adapters, one base) LoRA kernels on the same gate_proj shape: row tiles
    that never straddle a segment, a tile table (int32) and a segment table (int32 rows and ranks,
    int64 factor addresses and seeds, fp32 scalings and dropout)."""
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    K, N = HIDDEN, INTERMEDIATE
    common = dict(BLOCK_R=16, BLOCK_M=multi_lora.SEG_BLOCK_M_GPU, PRECISION="ieee")
    tiles = dict(tile_start_ptr=_t(i32), tile_end_ptr=_t(i32), tile_seg_ptr=_t(i32))
    segs = dict(seg_first_ptr=_t(i32), seg_rank_ptr=_t(i32), seg_a_ptr=_t(i64), seg_b_ptr=_t(i64),
                seg_scaling_ptr=_t(f32), seg_p_ptr=_t(f32), seg_keep_scale_ptr=_t(f32), seg_seed_ptr=_t(i64))
    Dropout = lora_linear.Dropout
    es = []
    for mode, name in ((Dropout.FROM_SEED, "seed"), (Dropout.FROM_MASK, "mask"), (Dropout.OFF, "no dropout")):
        mask = _t(torch.uint8) if mode == Dropout.FROM_MASK else None
        smm, smk = (K, 1) if mode == Dropout.FROM_MASK else (0, 0)
        es.append(Launch(f"multi_lora._multi_lora_fwd_kernel[{name}]", multi_lora._multi_lora_fwd_kernel,
                         dict(x_ptr=_t(dtype), w_ptr=_t(dtype), bias_ptr=_t(dtype), a_ptr=_t(dtype),
                              b_ptr=_t(dtype), mask_ptr=mask, y_ptr=_t(dtype), u_ptr=_t(dtype),
                              **tiles, **segs, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1,
                              stride_mm=smm, stride_mk=smk, stride_ym=N, stride_yn=1, stride_um=16,
                              stride_ur=1),
                         dict(HAS_BIAS=True, DROPOUT=int(mode), **common),
                         shared_bytes=multi_lora._seg_mm_shared_bytes))
        es.append(Launch(f"multi_lora._multi_lora_dx_kernel[{name}]", multi_lora._multi_lora_dx_kernel,
                         dict(x_ptr=_t(dtype), w_ptr=_t(dtype), a_ptr=_t(dtype), b_ptr=_t(dtype),
                              mask_ptr=mask, dx_ptr=_t(dtype), gb_ptr=_t(dtype), **tiles, **segs, N=K, K=N,
                              stride_gm=N, stride_gk=1, stride_wk=K, stride_wn=1, stride_mm=smm,
                              stride_mn=smk, stride_dm=K, stride_dn=1, stride_gbm=16, stride_gbr=1),
                         dict(HAS_DX=True, DROPOUT=int(mode), **common),
                         shared_bytes=multi_lora._seg_mm_shared_bytes))
        es.append(Launch(f"multi_lora._multi_lora_da_kernel[{name}]", multi_lora._multi_lora_da_kernel,
                         dict(gb_ptr=_t(dtype), x_ptr=_t(dtype), mask_ptr=mask, da_ptr=_t(f32),
                              seg_first_ptr=_t(i32), seg_end_ptr=_t(i32), seg_rank_ptr=_t(i32),
                              seg_p_ptr=_t(f32), seg_keep_scale_ptr=_t(f32), seg_seed_ptr=_t(i64), K=K,
                              SPLITS=4, stride_gbm=16, stride_gbr=1, stride_xm=K, stride_xk=1,
                              stride_mm=smm, stride_mk=smk),
                         dict(DROPOUT=int(mode), **common), shared_bytes=multi_lora._seg_da_shared_bytes))
    return es


def _specialise(fn, args: dict, constexprs: dict):
    """(signature, constexprs, attrs) for ``ASTSource``, as the runtime JIT specialises ``args``."""
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        ty, spec = native_specialize_impl(BaseBackend, args[name], False, True, True)
        if ty == "constexpr":  # None, or an integer equal to 1
            signature[name], consts[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _configs(launch: Launch, limit: int, quick: bool):
    """[(options, constexprs of the config, bound or None, compile it?)] for this launch and
    shared-memory limit: the configs the autotuner keeps (quick: only the kept one with the
    largest bound, i.e. the one nearest the limit)."""
    fn = launch.fn
    if not hasattr(fn, "configs"):  # a plain JITFunction: the launcher's options
        return [(opts, {}, None, True) for opts in launch.options]
    args = {**launch.args, **launch.constexprs}
    kept = prune_configs(fn.configs, args, launch.shared_bytes, limit)
    if quick:
        kept = [max(kept, key=lambda c: launch.shared_bytes(c, args))]
    out = []
    for config in fn.configs:
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        out.append((opts, dict(config.kwargs), launch.shared_bytes(config, args), config in kept))
    return out


def compile_all(targets=(80, 90), dtypes=("bf16", "fp32"), quick=True, log=None) -> list[dict]:
    """Compile the launches for each target and dtype; one record per (launch, config, target)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python")
    records = []
    for dtype_name in dtypes:
        for launch in launches(DTYPES[dtype_name]):
            if quick and not launch.quick:
                continue
            jit_fn = launch.fn.fn if hasattr(launch.fn, "configs") else launch.fn  # the Autotuner wraps it
            for cc in targets:
                limit = SHARED_MEMORY_LIMIT[cc]
                for opts, config_kwargs, bound, kept in _configs(launch, limit, quick):
                    record = dict(kernel=launch.kernel, dtype=dtype_name, target=f"sm_{cc}",
                                  config={**config_kwargs, **opts}, bound=bound, limit=limit, kept=kept)
                    if kept:
                        signature, consts, attrs = _specialise(jit_fn, launch.args,
                                                               {**launch.constexprs, **config_kwargs})
                        start = time.perf_counter()
                        try:
                            source = ASTSource(jit_fn, signature, constexprs=consts, attrs=attrs)
                            compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=opts)
                        except Exception as error:  # noqa: BLE001 (any compile error is reported; the test fails on it)
                            record.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
                        else:
                            shared = compiled.metadata.shared
                            ptx = compiled.asm["ptx"]
                            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None
                            record.update(ok=True, shared=shared, fits=shared <= limit,
                                          bound_holds=bound is None or shared <= bound, mma=mma)
                        record["compile_s"] = round(time.perf_counter() - start, 3)
                    records.append(record)
                    if log is not None:
                        log(_line(record))
    return records


def _line(r: dict) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
    if not r["kept"]:
        over = r["bound"] > r["limit"]
        why = f"bound {r['bound']} > {r['limit']}" if over else "not in the quick selection"
        return f"{r['kernel']:45s} {r['dtype']:4s} {r['target']:5s} skipped ({why}) [{cfg}]"
    if not r["ok"]:
        return f"{r['kernel']:45s} {r['dtype']:4s} {r['target']:5s} FAILED {r['error'][:200]}"
    return (f"{r['kernel']:45s} {r['dtype']:4s} {r['target']:5s} shared {r['shared']:6d} / {r['limit']} "
            f"{'ok ' if r['fits'] else 'OVER'} {r['mma'] or '':8s} {r['compile_s']:5.1f}s [{cfg}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--all", action="store_true",
                        help="every launch variant and every kept config (default: the quick selection)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = compile_all(tuple(int(t) for t in args.targets.split(",")), tuple(args.dtypes.split(",")),
                          quick=not args.all, log=lambda line: print(line, flush=True))
    failed = [r for r in records if r["kept"] and not (r["ok"] and r["fits"] and r["bound_holds"])]
    print(f"{sum(r['kept'] for r in records)} compiled, {len(failed)} failed or over the limit, "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
