"""Deterministic memory bounds (bytes allocated by torch, not time).

Method: :class:`opsd_kernels.memory.PeakMemory` records, on CPU, every new
storage that an aten operator returns and when it is freed, so the peak of
live bytes inside the block is exact for torch allocations. Running the same
forward+backward at two token counts N1 < N2 with everything else fixed,
the difference of the peaks must be explained by what necessarily grows
with N: the (N, H) student-hidden gradient and the per-token losses. A path
that materialised (N, V) anything would add (N2 - N1) * V * 4 bytes, far
more than the allowance.
"""

import pytest
import torch

from opsd_kernels import divergence, fused_linear_divergence
from opsd_kernels.memory import PeakMemory


def _peak_fused_linear(N, H, V, chunk_size, frozen=False, reduction="mean"):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, H, generator=g).requires_grad_()
    ht = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g).requires_grad_(not frozen)
    with PeakMemory() as pm:
        loss = fused_linear_divergence(
            hs,
            ht,
            w,
            impl="torch",
            chunk_size=chunk_size,
            clip=0.05,
            temperature=1.1,
            reduction=reduction,
        )
        loss.sum().backward() if reduction == "none" else loss.backward()
        del loss
    return pm.peak_bytes


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", [False, True])
def test_fused_linear_torch_peak_does_not_grow_with_tokens(frozen, reduction):
    H, V, chunk = 32, 2000, 32
    n1, n2 = 256, 2048
    p1 = _peak_fused_linear(n1, H, V, chunk, frozen, reduction)
    p2 = _peak_fused_linear(n2, H, V, chunk, frozen, reduction)
    grows = p2 - p1
    # the hidden gradient (N x H fp32) and per-token losses / upstream grads (a few N x 4 bytes)
    allowance = (n2 - n1) * (H * 4 + 4 * 4)
    assert grows <= allowance, (p1, p2, grows, allowance)
    # and the whole peak is a chunk's worth of vocabulary work (float32 temporaries),
    # the weight gradient and the hidden gradient: less than one N x V float32 tensor
    bound = chunk * V * 4 * 12 + 2 * V * H * 4 + n2 * (H * 4 + 16)
    assert p2 <= bound < n2 * V * 4, (p2, bound, n2 * V * 4)


def test_divergence_torch_extra_memory_is_bounded(monkeypatch):
    """Logits level: beyond the gradient outputs (unavoidable), the torch impl's
    temporaries are bounded by the chunk budget, not by N."""
    import opsd_kernels

    monkeypatch.setattr(opsd_kernels.config, "chunk_memory_budget", 2**20)  # 1 MiB
    V = 1000
    peaks = {}
    for N in (512, 2048):  # both large enough for the budget, not N, to set the block
        s = torch.randn(N, V).requires_grad_()
        t = torch.randn(N, V)
        with PeakMemory() as pm:
            divergence(s, t, kind="jsd", clip=0.01, impl="torch").backward()
        peaks[N] = pm.peak_bytes - N * V * 4  # minus the student gradient itself
    assert peaks[2048] - peaks[512] <= (2048 - 512) * 4 * 4
    assert peaks[2048] <= 2 * 2**20


def test_no_gradient_work_under_no_grad():
    """Under torch.no_grad the losses allocate no gradient buffers, even for inputs
    that require grad (a custom autograd Function would otherwise still see them)."""
    s = torch.randn(64, 500, requires_grad=True)
    t = torch.randn(64, 500)
    with torch.no_grad(), PeakMemory() as pm:
        divergence(s, t, impl="torch")
    with PeakMemory() as detached:
        divergence(s.detach(), t, impl="torch")
    assert pm.peak_bytes == detached.peak_bytes  # no (N, V) gradient buffer
    hs = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(5000, 16, requires_grad=True)
    with torch.no_grad(), PeakMemory() as pm:
        fused_linear_divergence(hs, hs.detach(), w, impl="torch", chunk_size=8)
    with PeakMemory() as detached:
        fused_linear_divergence(hs.detach(), hs.detach(), w.detach(), impl="torch", chunk_size=8)
    assert pm.peak_bytes == detached.peak_bytes  # no (V, H) weight or (N, H) hidden gradient
