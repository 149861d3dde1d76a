"""GEMMs with float32 results from 16-bit (or mixed) operands: the precision rule.

OPSD's teacher and student nearly agree, so the divergence is a small
difference of large logits: a bf16 logit of 16 is only good to +-0.06, more
than the whole teacher/student gap. So every chunked path forms its logits in
float32 (float64 when an input is float64), whatever the operands' dtype, and
the divergence reads only those float32 values.

The *operand* dtype of a GEMM (:func:`operand_dtype`) is the common dtype of
its two inputs when they agree, else float32 (mixed precision: a bf16 hidden
state against a float32 master lm_head is computed in float32). Where the
operands are 16-bit:

- on CUDA, ``torch.mm(..., out_dtype=torch.float32)`` gives a float32 result
  from 16-bit tensor-core inputs (probed once; torch versions without it fall
  back to the path below);
- elsewhere the operands are upcast one vocabulary slice at a time (at most
  :data:`SLICE_ELEMENTS` elements per temporary), so no float32 copy of the
  whole ``(V, H)`` weight is ever made.

Both give the same numbers up to the order of float32 accumulation, so the
CPU tests measure the precision that CUDA delivers.

The logit *gradient* is formed in float32 from the float32 logits; the
gradient GEMMs take it as an operand of the weight's dtype
(:func:`gradient_operand`). For float16 it is first multiplied by a power of
two chosen on the device (no host sync) so that its largest entry sits near
2^14: small entries keep their relative precision instead of going subnormal,
and the factor is divided out of the float32 GEMM result exactly.
"""

from __future__ import annotations

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
SLICE_ELEMENTS = 2**24  # 64 MiB of float32 per upcast temporary

_out_dtype_ok: dict[int, bool] = {}
_addmm_out_dtype_ok: dict[int, bool] = {}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype of logits and losses."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def operand_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype a GEMM of ``a`` and ``b`` operands runs in: theirs if they agree,
    else the compute dtype (float32, or float64)."""
    return a if a == b else compute_dtype(a, b)


def _cuda_out_dtype_supported(device: torch.device) -> bool:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _out_dtype_ok:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _out_dtype_ok[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _out_dtype_ok[key] = False
    return _out_dtype_ok[key]


def _cuda_addmm_in_place_supported(device: torch.device) -> bool:
    """``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` adds a 16-bit product
    into a float32 ``acc`` in place (probed once per device, result checked)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _addmm_out_dtype_ok:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            acc = torch.full((16, 16), 2.0, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _addmm_out_dtype_ok[key] = bool((acc == 18.0).all())  # once per device
        except (RuntimeError, TypeError, NotImplementedError):
            _addmm_out_dtype_ok[key] = False
    return _addmm_out_dtype_ok[key]


def _native_fp32_out(a: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype in SIXTEEN_BIT and _cuda_out_dtype_supported(a.device)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv=None) -> None:
    """``acc += (a @ b) * inv`` for a float32/float64 ``acc`` and operands of one dtype.

    In place without a product-sized temporary where the GEMM can add into ``acc``
    itself (operands of ``acc``'s dtype; 16-bit operands on CUDA through
    ``addmm(..., out_dtype=float32)``), when ``inv`` (a 0-dim tensor or None) is None;
    else the product is formed in ``acc``'s dtype and added. The contraction
    dimension is not sliced: ``a`` and ``b`` are bounded by the caller.
    """
    if inv is None and a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif inv is None and acc.dtype == torch.float32 and _native_fp32_out(a):
        if _cuda_addmm_in_place_supported(a.device):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        part = _mm_fp32(a, b, acc.dtype)
        acc.add_(part if inv is None else part.mul_(inv))


def _slice_rows(other_dim: int) -> int:
    return max(1, SLICE_ELEMENTS // max(1, other_dim))


def linear_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` as float32 (float64) logits, shape (rows, V).

    ``x`` (rows, H) and ``weight`` (V, H) may be 16-bit, float32 or mixed; see the
    module docstring for how the GEMM runs. ``out``, if given, is a (rows, V)
    tensor of the compute dtype to write into.
    """
    cdt = compute_dtype(x.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
    op = operand_dtype(x.dtype, weight.dtype)
    rows, V = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty(rows, V, dtype=cdt, device=x.device)
    if op == cdt:
        torch.mm(x.to(op), weight.to(op).t(), out=out)
    elif _native_fp32_out(x):
        out.copy_(torch.mm(x, weight.t(), out_dtype=torch.float32))
    else:
        xf = x.to(cdt)
        step = _slice_rows(weight.shape[1])
        for v0 in range(0, V, step):
            torch.mm(xf, weight[v0 : v0 + step].to(cdt).t(), out=out[:, v0 : v0 + step])
    if bias is not None:
        out.add_(bias.to(cdt))
    return out


def gradient_operand(grad: torch.Tensor, dtype: torch.dtype):
    """The float32 logit gradient as a GEMM operand of ``dtype``.

    Returns ``(operand, inverse_factor)``: the GEMM result must be multiplied by
    ``inverse_factor`` (a 0-dim float32 tensor, or None when no factor was used).
    float16: scaled by a power of two so that the largest entry is near 2^14
    (device-side, no host sync), keeping small entries out of the subnormals.
    """
    if dtype == grad.dtype:
        return grad, None
    if dtype == torch.float16:
        amax = grad.abs().amax().clamp(min=2.0**-100)
        # 2^(14 - ceil(log2 amax)): the largest entry lands in [2^13, 2^14]
        factor = torch.exp2(14.0 - torch.ceil(torch.log2(amax)))
        return (grad * factor).to(dtype), factor.reciprocal()
    return grad.to(dtype), None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """a @ b with a ``cdt`` result; 16-bit operands on CUDA use out_dtype."""
    if a.dtype == cdt:
        return torch.mm(a, b)
    if _native_fp32_out(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.to(cdt), b.to(cdt))


def grad_hidden(
    grad_op: torch.Tensor, inv: torch.Tensor | None, weight: torch.Tensor, cdt: torch.dtype
) -> torch.Tensor:
    """``grad @ weight`` (rows, H) in ``cdt`` from the operand of :func:`gradient_operand`.

    The contraction runs over the vocabulary in slices when operands are upcast.
    """
    w = weight if weight.dtype == grad_op.dtype else weight.to(grad_op.dtype)
    if grad_op.dtype == cdt or _native_fp32_out(grad_op):
        res = _mm_fp32(grad_op, w, cdt)
    else:
        V = w.shape[0]
        step = _slice_rows(max(w.shape[1], grad_op.shape[0]))
        res = torch.zeros(grad_op.shape[0], w.shape[1], dtype=cdt, device=w.device)
        for v0 in range(0, V, step):
            res.add_(torch.mm(grad_op[:, v0 : v0 + step].to(cdt), w[v0 : v0 + step].to(cdt)))
    return res if inv is None else res.mul_(inv)


def accumulate_grad_weight(
    acc: torch.Tensor,
    grad_op: torch.Tensor,
    inv: torch.Tensor | None,
    x: torch.Tensor,
    cdt: torch.dtype,
) -> None:
    """``acc += grad.T @ x`` with ``acc`` (V, H) of any float dtype.

    The product is formed in ``cdt`` one vocabulary slice at a time (a bounded
    temporary, never (V, H) float32 for a 16-bit ``acc``) and added to ``acc``.
    """
    xo = x if x.dtype == grad_op.dtype else x.to(grad_op.dtype)
    if acc.dtype == cdt and grad_op.dtype == cdt and inv is None:
        acc.addmm_(grad_op.t(), xo)
        return
    V = acc.shape[0]
    step = _slice_rows(max(acc.shape[1], grad_op.shape[0]))
    for v0 in range(0, V, step):
        part = _mm_fp32(grad_op[:, v0 : v0 + step].t(), xo, cdt)
        if inv is not None:
            part.mul_(inv)
        acc[v0 : v0 + step].add_(part)
