"""The Triton kernels compile for a real GPU (sm_90), even on a machine without one.

The interpreter (used on CPU) accepts code that the compiler rejects, so each
kernel specialisation is also compiled ahead of time for an H100-class target
(``triton.compile`` with a ``GPUTarget``; needs no driver, only Triton's
bundled compiler). It runs in a subprocess because TRITON_INTERPRET, read at
import, is set for the test session.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from opsd_kernels.triton.divergence_rows import _divergence_rows_kernel as k

    types = ["*bf16", "*bf16", "*bf16", "*bf16", "*fp32", "*u8", "*fp32",
             "i64", "i64", "i64", "i64", "i64", "i32", "fp32", "fp32", "fp32", "fp32", "fp32"]
    done = []
    for kind in (0, 1, 2):
        for clip in (False, True):
            for grads in ((True, True), (True, False), (False, False)):
                consts = dict(KIND=kind, ONE_PASS=kind < 2 and not clip, HAS_CLIP=clip,
                              HAS_MASK=True, GRAD_S=grads[0], GRAD_T=grads[1], BLOCK_V=4096)
                sig = dict(zip(k.arg_names, types + ["constexpr"] * len(consts)))
                out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts),
                                     target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": 8})
                assert out.asm["ptx"]
                done.append([kind, clip, grads])
    print(json.dumps(done))
    """
)


def test_row_kernel_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton build cannot compile ahead of time")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 18


# ---- the fused fused-linear kernels (impl="fused"): one specialisation per case ----
# (module, kernel, pointer dtype, constexprs); the statistics and accumulator pointers
# (fp32_ptrs in the script) are float32 whatever the input dtype
_FUSED = dict(HAS_MASK=True, SHARED_W=True, HAS_BIAS=True, HAS_TBIAS=False, UPCAST=False,
              DOT_PRECISION="ieee", BLOCK_N=64, BLOCK_V=128, BLOCK_K=64)
_SEPARATE = dict(_FUSED, SHARED_W=False, HAS_TBIAS=True)
FUSED_CASES = {
    "fused_stats_fkl_bf16": ("fused_forward", "_fused_stats_kernel", "bf16",
                             dict(KIND=0, ONE_PASS=True, **_FUSED)),
    "fused_stats_rkl_separate_fp16": ("fused_forward", "_fused_stats_kernel", "fp16",
                                      dict(KIND=1, ONE_PASS=True, **_SEPARATE)),
    "fused_terms_jsd_clip_bf16": ("fused_forward", "_fused_terms_kernel", "bf16",
                                  dict(KIND=2, HAS_CLIP=True, **_FUSED)),
    "fused_dh_fkl_clip_skip_bf16": ("fused_backward", "_fused_dh_kernel", "bf16",
                                    dict(KIND=0, HAS_CLIP=True, SKIP=True, **_FUSED)),
    "fused_dh_jsd_separate_fp32": ("fused_backward", "_fused_dh_kernel", "fp32",
                                   dict(KIND=2, HAS_CLIP=False, SKIP=False, **_SEPARATE)),
    "fused_dw_rkl_skip_bf16": ("fused_backward", "_fused_dw_kernel", "bf16",
                               dict(KIND=1, HAS_CLIP=False, SKIP=True, WANT_DW=True,
                                    WANT_DB=True, **_FUSED)),
    "fused_db_only_bf16": ("fused_backward", "_fused_dw_kernel", "bf16",
                           dict(KIND=0, HAS_CLIP=True, SKIP=False, WANT_DW=False,
                                WANT_DB=True, **_FUSED)),
}

FUSED_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget

    module, kernel, dtype, constexprs = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module("opsd_kernels.triton." + module), kernel)
    floats = {"inv_temp", "beta", "log_beta", "log_1m_beta", "clip", "skip_threshold"}
    fp32_ptrs = {"m_s_ptr", "z_s_ptr", "m_t_ptr", "z_t_ptr", "w_sum_ptr", "tmax_s_ptr",
                 "tmax_t_ptr", "lse_s_ptr", "lse_t_ptr", "loss_ptr", "g_sum_ptr",
                 "scale_ptr", "dh_ptr", "dw_ptr", "db_ptr"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    assert compiled.asm.get("cubin"), "no cubin"
    print("shared", compiled.metadata.shared)
""")


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_kernels_compile_for_sm90(case):
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", FUSED_SCRIPT, json.dumps(FUSED_CASES[case])],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton build cannot compile ahead of time")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # shared memory is only checked when a kernel loads on a device: check it here
    # against the H100/H200 per-block limit (227 KiB)
    shared = int(proc.stdout.split("shared")[-1].split()[0])
    assert shared <= 232_448, f"{case}: {shared} bytes of shared memory"
