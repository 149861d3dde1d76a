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


# ---- the fused fused-linear kernels (impl="fused"): compiled exactly as a real launch ----
# The launchers themselves run on "meta" tensors of a real shape (Qwen3-4B-like: N 8192,
# V 151,936) with each CUDA row of the config table; every kernel launch is recorded
# instead of run, the kernel's heuristics fill its constexpr flags, and Triton's own
# binder computes the specialisation (16-byte alignment of pointers, divisibility of
# integers) that a launch with those arguments gets. ptxas's log gives the spills.

FUSED_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, re, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Heuristics
    from triton.runtime.jit import create_function_from_signature
    from opsd_kernels._validation import check_options
    from opsd_kernels.triton import configs, fused_backward as fb, fused_forward as ff

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kw: calls.append((self.kernel, kw))

    for mod in (ff, fb):
        for name in dir(mod):
            if isinstance(getattr(mod, name), Heuristics):
                setattr(mod, name, Recorder(getattr(mod, name)))
    ff.device_programs = lambda device: 2 * 132  # an H100 / H200
    row = [r for r in configs.TABLE if r.device == "cuda"][int(sys.argv[1])]
    dtype = row.dtypes[0]
    H = next(h for h in (2560, 5120, 8192) if row.h_min <= h <= row.h_max)
    N, V = 8192, 151936

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    hs, ht, w, mask = empty(N, H), empty(N, H), empty(V, H), empty(N, dt=torch.bool)
    scale = empty(1, dt=torch.float32)
    cases = [  # (kind, clip, teacher weight, bias, teacher bias, bias trainable)
        ("forward_kl", 0.05, None, None, None, False),
        ("jsd", None, empty(V, H), empty(V), empty(V), True),
        ("reverse_kl", None, None, empty(V), None, False),
    ]
    for kind, clip, wt, b, bt, want_b in cases:
        opts = check_options(kind, 0.5, 1.1, clip, "mean")
        st = ff.fused_forward(hs, ht, w, wt, b, bt, mask, opts, cfg=row.config)
        for det in (True, False):
            fb.fused_backward(hs, ht, w, wt, b, bt, mask, st, scale, opts, skip_threshold=1e-6,
                              want_h=True, want_w=True, want_b=want_b, deterministic=det)
    if torch.float16 in row.dtypes:  # float16 gradients scale dS tiles (SCALE16)
        h16, w16 = empty(N, H, dt=torch.float16), empty(V, H, dt=torch.float16)
        for det in (True, False):
            fb.fused_backward(h16, h16, w16, None, None, None, mask, st, scale, opts,
                              skip_threshold=0.0, want_h=True, want_w=True, want_b=False,
                              deterministic=det)
    seen = {}
    for kernel, kw in calls:
        kw = dict(kw)
        for name, fn in kernel.values.items():
            kw[name] = fn(kw)
        jit = kernel.fn
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, spec, options = binder(**kw, debug=False)
        key = jit.__name__ + str(spec)
        if key in seen:
            continue
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v
            out = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                 options=options.__dict__)
        text = log.getvalue()
        seen[key] = dict(
            kernel=jit.__name__, shared=out.metadata.shared,
            spills=sum(int(x) for x in re.findall(r"(\\d+) bytes spill", text)),
            logged="registers" in text, cubin=bool(out.asm.get("cubin")))
    print(json.dumps(list(seen.values())))
""")

FUSED_KERNELS = {"_fused_stats_kernel", "_fused_terms_kernel", "_fused_dh_kernel",
                 "_fused_dw_kernel", "_fused_backward_kernel"}


def _cuda_rows():
    from opsd_kernels.triton.configs import TABLE

    return [f"{i}-H{r.h_min}-{r.h_max}-{str(r.dtypes[0]).split('.')[-1]}"
            for i, r in enumerate(r for r in TABLE if r.device == "cuda")]


@pytest.mark.parametrize("row", _cuda_rows())
def test_fused_kernels_compile_for_sm90_as_launched(row):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1",
               TRITON_DUMP_PTXAS_LOG="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", FUSED_SCRIPT, row.split("-")[0]], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton build cannot compile ahead of time")
    if proc.returncode != 0 and "create_function_from_signature" in proc.stderr:
        pytest.skip("this Triton version's launch binder differs (the test follows triton 3.9)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == FUSED_KERNELS
    for r in results:
        assert r["cubin"] and r["logged"], r
        assert r["spills"] == 0, f"{row}: register spills {r}"
        # shared memory is only checked when a kernel loads on a device: check it here
        # against the H100/H200 per-block limit (227 KiB)
        assert r["shared"] <= 232_448, f"{row}: {r}"
