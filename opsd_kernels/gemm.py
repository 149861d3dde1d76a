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
_mm_into_ok: dict[int, bool] = {}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype of logits and losses."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def operand_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype a GEMM of ``a`` and ``b`` operands runs in: theirs if they agree,
    else the compute dtype (float32, or float64)."""
    return a if a == b else compute_dtype(a, b)


def _probe(cache: dict, device: torch.device, check) -> bool:
    """``check(device)`` once per CUDA device, cached; False while a CUDA graph is being
    captured (the probe reads its result on the host), without caching that."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in cache:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            cache[key] = bool(check(device))  # one host read per device and process
        except (RuntimeError, TypeError, NotImplementedError):
            cache[key] = False
    return cache[key]


def _probe_operands(device: torch.device):
    """A bf16 product whose float32 result is exact and whose sum with ``2 + 2^-18``
    is exact in float32 but not in bf16, with a transposed, strided left operand
    (the layouts the gradient GEMMs pass)."""
    g = torch.arange(48 * 32, device=device, dtype=torch.float32).view(48, 32) % 7 - 3
    a = g.to(torch.bfloat16)[::3].t()  # (32, 16), strided and transposed
    b = (g[:16, :16] % 5 - 2).to(torch.bfloat16)
    return a, b, a.float() @ b.float()  # small integers: exact in every order


def _check_mm_out_dtype(device):
    a, b, want = _probe_operands(device)
    return torch.equal(torch.mm(a, b, out_dtype=torch.float32), want)


def _check_mm_out_dtype_into(device):
    a, b, want = _probe_operands(device)
    buf = torch.empty(40, 16, dtype=torch.float32, device=device)[4:36]
    torch.mm(a, b, out_dtype=torch.float32, out=buf)
    return torch.equal(buf, want)


def _check_addmm_in_place(device):
    a, b, want = _probe_operands(device)
    acc = torch.full((32, 16), 2.0 + 2.0**-18, dtype=torch.float32, device=device)
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return torch.equal(acc, want + (2.0 + 2.0**-18))


def _native_fp32_out(a: torch.Tensor) -> bool:
    """16-bit CUDA operands whose GEMMs give float32 results directly (``out_dtype``)."""
    return (
        a.is_cuda
        and a.dtype in SIXTEEN_BIT
        and _probe(_out_dtype_ok, a.device, _check_mm_out_dtype)
    )


def adds_in_place(a: torch.Tensor) -> bool:
    """Whether :func:`add_product` adds a product of ``a``'s dtype into a float32
    accumulator in place, without a temporary (no ``inv``)."""
    if a.dtype == torch.float32:
        return True
    return _native_fp32_out(a) and _probe(_addmm_out_dtype_ok, a.device, _check_addmm_in_place)


def add_product(
    acc: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    inv: torch.Tensor | None = None,
    buf: torch.Tensor | None = None,
) -> None:
    """``acc += (a @ b) * inv`` for a float32/float64 ``acc`` and operands of one dtype.

    The product is formed in ``acc``'s dtype, never rounded to the operands' 16 bits.
    In place, without a temporary, where the GEMM can add into ``acc`` itself: operands
    of ``acc``'s dtype, or 16-bit operands on CUDA where ``addmm(..., out_dtype=float32)``
    accepts a float32 ``acc`` (probed, exact result checked; torch 2.10+), when ``inv``
    (a 0-dim tensor) is None. Otherwise the product goes to ``buf`` (a float32 tensor of
    ``acc``'s shape, reused by the caller) when given and supported, else to a new
    temporary (:func:`product`), and is added. The contraction dimension is not sliced: the caller
    bounds ``a`` and ``b``.
    """
    if inv is None and a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if inv is None and acc.dtype == torch.float32 and a.is_cuda and adds_in_place(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    acc.add_(product(a, b, acc.dtype, inv, buf))


def writes_into_buffer(a: torch.Tensor) -> bool:
    """Whether a 16-bit GEMM of ``a``'s dtype and device writes a float32 product into a
    given buffer (``mm(..., out_dtype=float32, out=buf)``, probed)."""
    return _native_fp32_out(a) and _probe(_mm_into_ok, a.device, _check_mm_out_dtype_into)


def product(
    a: torch.Tensor,
    b: torch.Tensor,
    cdt: torch.dtype,
    inv: torch.Tensor | None = None,
    buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(a @ b) * inv`` as a ``cdt`` tensor, into ``buf`` (``cdt``, the product's shape)
    where the GEMM can write it there, else a new tensor."""
    if buf is not None and a.dtype == cdt:
        res = torch.mm(a, b, out=buf)
    elif buf is not None and writes_into_buffer(a):
        res = torch.mm(a, b, out_dtype=torch.float32, out=buf)
    else:
        res = _mm_fp32(a, b, cdt)
    return res if inv is None else res.mul_(inv)


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


def gradient_operand(grad: torch.Tensor, dtype: torch.dtype, in_place: bool = False):
    """The float32 logit gradient as a GEMM operand of ``dtype``.

    Returns ``(operand, inverse_factor)``: the GEMM result must be multiplied by
    ``inverse_factor`` (a 0-dim float32 tensor, or None when no factor was used).
    float16: scaled by a power of two so that the largest entry is near 2^14
    (device-side, no host sync), keeping small entries out of the subnormals; one
    factor for all of ``grad``, so a row whose entries are ~2^-24 times the largest
    loses relative precision. ``in_place``: ``grad`` is scratch and may be scaled in
    place (no float32 temporary).
    """
    if dtype == grad.dtype:
        return grad, None
    if dtype == torch.float16:
        amax = torch.linalg.vector_norm(grad, float("inf")).clamp(min=2.0**-100)
        # 2^(14 - ceil(log2 amax)): the largest entry lands in [2^13, 2^14]
        factor = torch.exp2(14.0 - torch.ceil(torch.log2(amax)))
        scaled = grad.mul_(factor) if in_place else grad * factor
        return scaled.to(dtype), factor.reciprocal()
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
