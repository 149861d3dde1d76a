"""One registry of divergence kinds: every layer reads ``opsd_kernels.divergences.KINDS``."""

from __future__ import annotations

import pytest

from opsd_kernels import reference
from opsd_kernels.divergences import FORWARD_KL_ID, JSD_ID, KINDS, REVERSE_KL_ID


def test_kind_ids_are_unique_and_named():
    ids = [spec.kind_id for spec in KINDS.values()]
    assert len(set(ids)) == len(ids)
    assert (KINDS["forward_kl"].kind_id, KINDS["reverse_kl"].kind_id, KINDS["jsd"].kind_id) == (
        FORWARD_KL_ID,
        REVERSE_KL_ID,
        JSD_ID,
    )
    for name, spec in KINDS.items():
        assert spec.name == name


def test_triton_constants_follow_the_registry():
    from opsd_kernels.triton import formulas

    assert (formulas.FORWARD_KL.value, formulas.REVERSE_KL.value, formulas.JSD.value) == (
        FORWARD_KL_ID,
        REVERSE_KL_ID,
        JSD_ID,
    )


def test_reference_covers_exactly_the_registered_kinds():
    assert set(reference.POINTWISE) == set(KINDS)
    import torch

    with pytest.raises(ValueError, match="kind must be one of"):
        reference.divergence_reference(torch.zeros(2, 3), torch.zeros(2, 3), kind="tvd")


def test_kernel_options_come_from_one_helper():
    """configs.option_args is the one place options become kernel scalars."""
    from opsd_kernels._validation import check_options
    from opsd_kernels.triton.configs import option_args

    for kind in KINDS:
        args = option_args(check_options(kind, 0.3, 2.0, 0.05, "mean"))
        assert args["KIND"] == KINDS[kind].kind_id and args["HAS_CLIP"]
        assert args["inv_temp"] == 0.5 and args["clip"] == 0.05
