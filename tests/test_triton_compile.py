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
