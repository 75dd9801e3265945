"""Every kernel compiles for sm_80 and sm_90 through Triton's CUDA compiler, on this
GPU-less machine, and the shared memory of each compiled config fits the target.

The interpreter (TRITON_INTERPRET=1, set for the other tests) replaces @triton.jit
functions with Python, so the compilation runs in a subprocess without it:
``python -m peftloop.kernels._aot`` (the quick selection, ~30-45 s on 2 cores cold; Triton
caches the results in ~/.triton/cache, so reruns take a few seconds).
"""

import json
import os
import subprocess
import sys

import pytest

from peftloop.kernels import triton_available
from peftloop.kernels._triton_utils import SHARED_MEMORY_LIMIT

KERNELS = {
    "swiglu._swiglu_fwd_kernel", "swiglu._swiglu_bwd_kernel",
    "rms_norm._rms_norm_fwd_kernel", "rms_norm._rms_norm_bwd_kernel",
    "rope._rope_kernel[fwd]", "rope._rope_kernel[bwd]",
    "linear_cross_entropy._ce_chunk_kernel",
    "lora_linear._lora_fwd_kernel[seed]", "lora_linear._lora_fwd_kernel[mask]",
    "lora_linear._lora_dx_kernel[seed]", "lora_linear._lora_dx_kernel[mask]",
    "lora_linear._lora_da_kernel[seed]", "lora_linear._lora_da_kernel[mask]",
    "lora_linear._dropout_mask_kernel",
    "nf4._nf4_dequant_kernel[double_quant]", "nf4._nf4_dequant_kernel[fp32_absmax]",
    "multi_lora._multi_lora_fwd_kernel[seed]", "multi_lora._multi_lora_fwd_kernel[mask]",
    "multi_lora._multi_lora_dx_kernel[seed]", "multi_lora._multi_lora_dx_kernel[mask]",
    "multi_lora._multi_lora_da_kernel[seed]", "multi_lora._multi_lora_da_kernel[mask]",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "peftloop.kernels._aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), f"the compile check did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(proc.stdout)
    return json.loads(out.read_text()), proc


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="no Triton")
def test_every_kernel_compiles_for_sm80_and_sm90_within_shared_memory(compiled):
    records, proc = compiled
    built = [r for r in records if r["kept"]]
    failed = [f"{r['kernel']} {r['dtype']} {r['target']}: {r.get('error')}" for r in built if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in built:
        where = f"{r['kernel']} {r['dtype']} {r['target']} {r['config']}"
        assert r["limit"] == SHARED_MEMORY_LIMIT[int(r["target"][3:])]
        assert r["shared"] <= r["limit"], f"{where}: {r['shared']} B of shared memory > {r['limit']}"
        if r["bound"] is not None:  # the autotuner prunes with this bound: it must not be exceeded
            assert r["shared"] <= r["bound"], f"{where}: {r['shared']} B > the pruning bound {r['bound']}"
    for target in ("sm_80", "sm_90"):
        for dtype in ("bf16", "fp32"):
            have = {r["kernel"] for r in built if r["target"] == target and r["dtype"] == dtype}
            want = KERNELS if dtype == "bf16" else {k for k in KERNELS if not k.endswith("[seed]")}
            assert want <= have, f"{target} {dtype}: not compiled: {sorted(want - have)}"
    # the LoRA matmuls run on the tensor cores: wgmma on Hopper, mma.sync on Ampere
    fwd = [r for r in built if r["kernel"] == "lora_linear._lora_fwd_kernel[seed]" and r["dtype"] == "bf16"]
    assert {r["target"]: r["mma"] for r in fwd} == {"sm_80": "mma.sync", "sm_90": "wgmma"}
    assert proc.returncode == 0, proc.stdout[-2000:]
