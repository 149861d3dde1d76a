"""Per-token statistics that the losses return beside the loss (``return_stats=True``).

What the clip does is invisible in the loss alone: a clipped entry passes no
gradient, yet with ``clip_mode="entry"`` it still sits in the softmax and the
student is pushed away from it (see :class:`~opsd_kernels._validation.DivergenceOptions`).
These statistics make it visible, and come out of the passes the kernels already
make over the vocabulary (no extra pass).

Internally a row function fills a float32 ``(R, NUM_STATS)`` buffer, one column per
statistic in the order of :data:`STATS_COLUMNS`; masked rows get 0 in every column.
:func:`public_stats` turns it into :class:`DivergenceStats` with the inputs' leading
shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: columns of the internal (R, NUM_STATS) float32 buffer, in order
STATS_COLUMNS = (
    "student_entropy",
    "teacher_clipped_mass",
    "clipped_entries",
    "teacher_top1_clipped",
)
NUM_STATS = len(STATS_COLUMNS)
STUDENT_ENTROPY, TEACHER_CLIPPED_MASS, CLIPPED_ENTRIES, TEACHER_TOP1_CLIPPED = range(NUM_STATS)


class DivergenceStats(NamedTuple):
    """Per-token statistics, each of the inputs' leading shape ``(...)``, no gradient.

    Every statistic is of the distributions the loss uses (after ``logit_scale``,
    ``softcap`` and ``temperature``). Positions where ``mask`` is False hold 0.

    - ``student_entropy`` (float32): ``-sum_v pS_v log pS_v``.
    - ``teacher_clipped_mass`` (float32): ``sum`` of ``pT_v`` over the clipped entries
      (``clip_mode`` ``"entry"``/``"entry_keep"``: entries with ``not phi_v < clip``;
      ``"token"``: 1 when the token is clipped, else 0; no clip: 0).
    - ``clipped_entries`` (int32): how many entries were clipped (``"token"``: V when
      the token is clipped, else 0; no clip: 0).
    - ``teacher_top1_clipped`` (bool): whether an entry holding the teacher's largest
      probability was clipped.
    """

    student_entropy: torch.Tensor
    teacher_clipped_mass: torch.Tensor
    clipped_entries: torch.Tensor
    teacher_top1_clipped: torch.Tensor


def new_stats_buffer(rows: int, device: torch.device) -> torch.Tensor:
    """The float32 ``(rows, NUM_STATS)`` buffer a row function fills (zeroed)."""
    return torch.zeros(rows, NUM_STATS, dtype=torch.float32, device=device)


def public_stats(buffer: torch.Tensor, lead: torch.Size) -> DivergenceStats:
    """:class:`DivergenceStats` of leading shape ``lead`` from an (R, NUM_STATS) buffer."""
    buffer = buffer.detach()
    return DivergenceStats(
        student_entropy=buffer[:, STUDENT_ENTROPY].float().reshape(lead),
        teacher_clipped_mass=buffer[:, TEACHER_CLIPPED_MASS].float().reshape(lead),
        clipped_entries=buffer[:, CLIPPED_ENTRIES].round().to(torch.int32).reshape(lead),
        teacher_top1_clipped=(buffer[:, TEACHER_TOP1_CLIPPED] > 0.5).reshape(lead),
    )
