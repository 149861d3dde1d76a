"""Baselines the benchmark compares opsd_kernels against.

* ``naive_*``: the method's reference code path. Full teacher and student
  logits, ``log_softmax``, the elementwise divergence through ``F.kl_div``
  (per-entry clip with ``clamp``), sum over the vocabulary, token mean; the
  backward is plain autograd through all of it.
* ``compiled_chunked_linear``: ``torch.compile`` of a token-chunked loss. Per
  chunk of tokens a compiled function forms the chunk's logits, the loss and,
  through ``torch.func.grad_and_value``, its gradients; the gradients are
  accumulated in the forward (so no chunk's activations outlive its chunk) and
  scaled in the backward. ``compiled_chunked_logits`` is the same on logits.
* ``liger_*``: Liger-Kernel's modules (CUDA only, imported lazily; ``None``
  when liger-kernel is not installed).
* ``trl_chunked_divergence``: TRL 1.16.0's ``ChunkedDivergenceFunction``
  (``trl.kernels.chunked_divergence``, the loss of its ``DistillationTrainer``):
  token- and vocabulary-chunked, its torch path on CPU and its Triton kernels on
  CUDA, per-token divergence (and entropy) reduced to the token mean here.

Liger and TRL's kernel have no per-entry clip; their cases always compute the
unclipped loss, and the report says so. A final-logit soft cap (``softcap``,
Gemma 2's ``c * tanh(x / c)`` before the temperature) is taken by the naive,
compiled and TRL paths; Liger has none (the bench skips it on capped presets).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from opsd_kernels.divergences import KINDS

# --------------------------------------------------------------------------- naive


def check_kind(kind: str) -> None:
    """Raise for a kind the library does not know (the registry is ``divergences.KINDS``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")


def naive_pointwise(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Elementwise divergence terms from log-probabilities, as the reference code writes it.

    Every kind of ``opsd_kernels.divergences.KINDS`` needs a branch here; an
    unknown kind, or a registered kind without a branch, raises.
    """
    check_kind(kind)
    if kind == "forward_kl":  # KL(p_T || p_S): F.kl_div(input=log p_S, target=log p_T)
        return F.kl_div(ls, lt, log_target=True, reduction="none")
    if kind == "reverse_kl":  # KL(p_S || p_T)
        return F.kl_div(lt, ls, log_target=True, reduction="none")
    if kind == "jsd":  # generalized JSD (TRL GKD convention for the mixture)
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
        return beta * F.kl_div(lm, lt, log_target=True, reduction="none") + (1 - beta) * F.kl_div(
            lm, ls, log_target=True, reduction="none"
        )
    raise NotImplementedError(
        f"the naive baseline has no formula for kind {kind!r}: add one "
        "to bench/baselines.py:naive_pointwise"
    )


def naive_divergence(s, t, *, kind="forward_kl", beta=0.5, temperature=1.0, clip=None):
    """Token-mean divergence on full logits (N, V), the reference code's chain."""
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    per = naive_pointwise(ls, lt, kind, beta)
    if clip is not None:
        per = per.clamp(max=clip)
    return per.sum(-1).mean()


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft cap ``softcap * tanh(logits / softcap)``; None: unchanged."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def naive_linear(
    h_s, h_t, weight, *, kind="forward_kl", beta=0.5, temperature=1.0, clip=None, softcap=None
):
    """Token-mean divergence from hidden states: both full logits are materialised
    (soft-capped first when ``softcap`` is given, as the model does)."""
    s = soft_cap(h_s @ weight.t(), softcap)
    with torch.no_grad():  # the teacher is a constant (stop-gradient)
        t = soft_cap(h_t @ weight.t(), softcap)
    return naive_divergence(s, t, kind=kind, beta=beta, temperature=temperature, clip=clip)


def naive_linear_16bit(
    h_s, h_t, weight, *, kind="forward_kl", beta=0.5, temperature=1.0, clip=None
):
    """As :func:`naive_linear`, but log_softmax and F.kl_div in the input dtype too.

    This is the reference code run on a 16-bit model as written (TRL's
    ``generalized_jsd_loss`` on bf16 logits): no upcast anywhere.
    """
    s = h_s @ weight.t()
    with torch.no_grad():
        t = h_t @ weight.t()
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)
    per = naive_pointwise(ls, lt, kind, beta)
    if clip is not None:
        per = per.clamp(max=clip)
    return per.sum(-1).mean()


# --------------------------------------------------------------- torch.compile, chunked


def _chunk_loss_linear(h_s, weight, h_t, teacher_weight, kind, beta, temperature, clip, softcap):
    s = soft_cap(h_s @ weight.t(), softcap)
    t = soft_cap(h_t @ teacher_weight.t(), softcap)  # a separate argument: never differentiated
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    per = naive_pointwise(ls, lt, kind, beta)
    if clip is not None:
        per = per.clamp(max=clip)
    return per.sum()


@functools.cache
def _compiled_grad_fn(argnums: tuple[int, ...], logits: bool):
    if logits:
        fn = torch.func.grad_and_value(_chunk_loss_logits, argnums=argnums)
    else:
        fn = torch.func.grad_and_value(_chunk_loss_linear, argnums=argnums)
    return torch.compile(fn, dynamic=False)


@functools.cache
def _compiled_fwd_fn(logits: bool):
    return torch.compile(_chunk_loss_logits if logits else _chunk_loss_linear, dynamic=False)


def _chunk_loss_logits(s, t, kind, beta, temperature, clip, softcap=None):
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    per = naive_pointwise(ls, lt, kind, beta)
    if clip is not None:
        per = per.clamp(max=clip)
    return per.sum()


class _ChunkedCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, opts, chunk, logits):
        need_a = ctx.needs_input_grad[0]
        need_w = (not logits) and ctx.needs_input_grad[2]
        n = a.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=a.device)
        if not (need_a or need_w):
            fn = _compiled_fwd_fn(logits)
            for i in range(0, n, chunk):
                args = (
                    (a[i : i + chunk], b[i : i + chunk])
                    if logits
                    else (a[i : i + chunk], weight, b[i : i + chunk], weight.detach())
                )
                total += fn(*args, *opts)
            ctx.save_for_backward()
            return total / n
        argnums = tuple(x for x, keep in ((0, need_a), (1, need_w)) if keep)
        fn = _compiled_grad_fn(argnums, logits)
        grad_a = torch.empty_like(a) if need_a else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for i in range(0, n, chunk):
            args = (
                (a[i : i + chunk], b[i : i + chunk])
                if logits
                else (a[i : i + chunk], weight, b[i : i + chunk], weight.detach())
            )
            grads, value = fn(*args, *opts)
            total += value
            grads = list(grads)
            if need_a:
                grad_a[i : i + chunk] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)
        ctx.save_for_backward(grad_a, grad_w)
        ctx.n = n
        ctx.need = (need_a, need_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_a, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        ga = grad_a * scale.to(grad_a.dtype) if ctx.need[0] else None
        gw = (grad_w * scale).to(grad_w.dtype) if ctx.need[1] else None
        return ga, None, gw, None, None, None


def compiled_chunked_linear(
    h_s,
    h_t,
    weight,
    *,
    kind="forward_kl",
    beta=0.5,
    temperature=1.0,
    clip=None,
    softcap=None,
    chunk=1024,
):
    """torch.compile of a token-chunked fused-linear loss (token mean), grads in the forward."""
    out = _ChunkedCompiled.apply(
        h_s, h_t.detach(), weight, (kind, beta, temperature, clip, softcap), chunk, False
    )
    return out


def compiled_chunked_logits(
    s, t, *, kind="forward_kl", beta=0.5, temperature=1.0, clip=None, chunk=1024
):
    """torch.compile of a token-chunked divergence on logits (token mean)."""
    return _ChunkedCompiled.apply(s, t.detach(), s, (kind, beta, temperature, clip), chunk, True)


# -------------------------------------------------------------------------- Liger


def liger_available() -> bool:
    """True when liger-kernel imports and CUDA is present (its kernels are Triton, GPU only)."""
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel  # noqa: F401
    except Exception:  # pragma: no cover - not installed or broken
        return False
    return True


def gkd_beta(kind: str, beta: float) -> float:
    """The generalized-JSD beta of Liger and TRL for our kind: 0 forward KL, 1 reverse KL,
    beta for JSD (both mix ``(1 - beta) p_S + beta p_T``, as our ``jsd`` does)."""
    check_kind(kind)
    if kind == "forward_kl":
        return 0.0
    if kind == "reverse_kl":
        return 1.0
    if kind == "jsd":
        return beta
    raise NotImplementedError(f"Liger has no counterpart of kind {kind!r}")


def liger_fused_linear_jsd(kind, beta, temperature):
    """LigerFusedLinearJSD (token-chunked GEMM + Triton JSD rows); call(h_s, h_t, W)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    mod = LigerFusedLinearJSD(jsd_beta=gkd_beta(kind, beta), temperature=temperature)
    return lambda h_s, h_t, w: mod(h_s, w, h_t, w, None)


def liger_chunked_available() -> bool:
    """True when liger-kernel imports: its chunked losses are torch-level and run on CPU too."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception:  # pragma: no cover - not installed or broken
        return False
    return True


def liger_fused_linear_jsd_loss(kind, beta, temperature, compiled=True):
    """chunked_loss LigerFusedLinearJSDLoss (torch.compile per chunk unless ``compiled=False``),
    soft loss only (``weight_hard_loss=0``); call(h_s, h_t, W)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mod = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=gkd_beta(kind, beta),
        temperature=temperature,
        compiled=compiled,
    )
    labels = {}

    def call(h_s, h_t, w):
        key = (h_s.shape[0], h_s.device)
        if key not in labels:
            g = torch.Generator(device="cpu").manual_seed(0)
            labels[key] = torch.randint(0, w.shape[0], (h_s.shape[0],), generator=g).to(h_s.device)
        return mod(h_s, w, h_t, w, labels[key])

    return call


def liger_kldiv(temperature):
    """LigerKLDIVLoss on log-probabilities (forward KL only); call(s, t) on logits."""
    from liger_kernel.transformers import LigerKLDIVLoss

    mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def call(s, t):
        return mod(
            F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1)
        )

    return call


def liger_jsd(kind, beta, temperature):
    """LigerJSD on log-probabilities (beta 0/1 for the KL kinds); call(s, t) on logits."""
    from liger_kernel.transformers import LigerJSD

    mod = LigerJSD(beta=gkd_beta(kind, beta))

    def call(s, t):
        return mod(
            F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1)
        )

    return call


# ---------------------------------------------------------------------------- TRL

#: TRL's module and class: the one place the bench names them (TRL 1.16.0; the class is
#: not in ``trl.kernels.__all__``). tests/test_gpu_check.py fails loudly when they move.
TRL_KERNEL_MODULE = "trl.kernels.chunked_divergence"
TRL_KERNEL_CLASS = "ChunkedDivergenceFunction"
#: the one name the kernel's module takes from ``trl.trainer.utils``, whose other imports
#: (accelerate, datasets, pandas) a GPU image may lack
TRL_TRAINER_IMPORT = "maybe_gather_lm_head_ctx"


@functools.cache
def trl_kernel() -> tuple[type | None, str]:
    """``(ChunkedDivergenceFunction, how it was imported)``, or ``(None, why not)``.

    The plain import first. When that fails only because ``trl.trainer.utils`` needs a
    package this machine lacks (the GPU image has no accelerate or datasets), the module
    is imported with a stand-in ``trl.trainer.utils`` whose ``maybe_gather_lm_head_ctx``
    is a null context: TRL's own function without DeepSpeed ZeRO-3, which is what it
    returns then. The kernel code measured is TRL's either way; the note says which.
    """
    import contextlib
    import importlib
    import sys
    import types

    try:
        mod = importlib.import_module(TRL_KERNEL_MODULE)
        how = "import"
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name == "trl" or exc.name.startswith("trl."):
            return None, f"TRL is not installed ({exc})"
        missing = exc.name
        for name in [m for m in sys.modules if m.startswith("trl.")]:
            if "kernels" in name or name == "trl.trainer.utils":
                del sys.modules[name]
        stand_in = types.ModuleType("trl.trainer.utils")
        setattr(stand_in, TRL_TRAINER_IMPORT, lambda *params: contextlib.nullcontext())
        saved = sys.modules.get("trl.trainer.utils")
        sys.modules["trl.trainer.utils"] = stand_in
        try:
            mod = importlib.import_module(TRL_KERNEL_MODULE)
        except Exception as exc2:  # noqa: BLE001 - reported as a skip reason
            return None, f"TRL's kernel does not import: {exc2!r}"
        finally:
            if saved is None:
                sys.modules.pop("trl.trainer.utils", None)
            else:
                sys.modules["trl.trainer.utils"] = saved
        how = f"trl.trainer.utils stood in for (no {missing} here)"
    except Exception as exc:  # noqa: BLE001
        return None, f"TRL's kernel does not import: {exc!r}"
    fn = getattr(mod, TRL_KERNEL_CLASS, None)
    if fn is None:
        return None, f"{TRL_KERNEL_MODULE} has no {TRL_KERNEL_CLASS}"
    from importlib.metadata import version

    return fn, f"TRL {version('trl')}, {how}"


def trl_available() -> bool:
    return trl_kernel()[0] is not None


def trl_chunked_divergence(kind, beta, temperature, softcap=None):
    """TRL's ``ChunkedDivergenceFunction`` on a shared lm_head (self-distillation);
    call(h_s, h_t, W) -> the token mean of its per-token divergence (our ``mean``).

    TRL's arguments: student hidden, weight, bias, teacher hidden, weight, bias, beta
    (:func:`gkd_beta`), temperature, then per role a logit scale (1) and a final-logit
    soft cap. Its gradient flows to the student hidden states and weight only. No clip.
    """
    fn, why = trl_kernel()
    if fn is None:
        raise RuntimeError(why)
    b = gkd_beta(kind, beta)

    def call(h_s, h_t, w):
        per_token, _entropy = fn.apply(
            h_s, w, None, h_t, w, None, b, temperature, 1.0, softcap, 1.0, softcap
        )
        return per_token.mean()

    return call
