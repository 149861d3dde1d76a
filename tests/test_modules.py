"""The nn.Module forms pass every constructor option to their function, unchanged."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import opsd_kernels as ok
from opsd_kernels import modules


@pytest.mark.parametrize(
    "module, function",
    [
        (modules.Divergence, ok.divergence),
        (modules.FusedLinearDivergence, ok.fused_linear_divergence),
        (modules.TopkDivergence, ok.topk_divergence),
        (modules.FusedLinearTopkDivergence, ok.fused_linear_topk_divergence),
    ],
)
def test_module_options_are_the_function_keywords(module, function, monkeypatch):
    """Every constructor option is a keyword of the function with the same default, and
    reaches it (recorded through a stand-in), including after a later attribute change."""
    options = inspect.signature(module.__init__).parameters
    keywords = inspect.signature(function).parameters
    names = [n for n in options if n != "self"]
    for name in names:
        assert name in keywords, name
        assert options[name].default == keywords[name].default, name
    seen = {}
    # the top-k functions are imported from opsd_kernels.topk at call time
    home = (
        modules
        if function.__name__ in vars(modules)
        else importlib.import_module("opsd_kernels.topk")
    )
    monkeypatch.setattr(home, function.__name__, lambda *args, **kw: seen.update(kw))
    mod = module(clip=0.05)
    mod.temperature = 1.5
    n_inputs = 4 if "Topk" in module.__name__ else 3
    mod(*[torch.zeros(1)] * n_inputs)
    assert {n: seen[n] for n in names} == {
        **{n: options[n].default for n in names},
        "clip": 0.05,
        "temperature": 1.5,
    }
    assert "clip=0.05" in repr(mod)
