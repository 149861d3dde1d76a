"""Answer checker cases (math-verify and its fallback), evaluation data without solutions,
and the evaluation protocol (sampling arguments, presets, optional greedy pass)."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from opsd_train import evaluate as ev
from opsd_train.data import Problem
from opsd_train.evaluate import (
    EVAL_PRESETS,
    EvalSampling,
    answer_checker,
    answers_match,
    eval_preset,
    eval_problems_from_records,
    evaluate_problems,
    extract_boxed,
    is_correct,
    load_eval_jsonl,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text, want",
    [
        (r"\boxed{42}", "42"),
        (r"a \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed {x^{2}+1}", "x^{2}+1"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and an unclosed \boxed{4", "3"),
        ("no answer", None),
        (r"\boxed{", None),
        ("", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize(
    "pred, ref, want",
    [
        ("42", "42", True),
        (" 42 ", "42", True),
        ("42.", "42", True),
        ("42.0", "42", True),
        ("0042", "42", True),
        ("1,000", "1000", True),
        ("$5$", "5", True),
        (r"\text{5}", "5", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
        ("1/2", "0.5", True),
        (r"-\frac{3}{4}", "-0.75", True),
        ("50\\%", "0.5", True),
        ("+7", "7", True),
        ("1e3", "1000", True),
        ("43", "42", False),
        ("4.2", "42", False),
        ("1/3", "0.333", False),
        ("x", "y", False),
        ("", "", False),
        (None, "1", False),
        ("1/0", "1", False),
    ],
)
def test_answers_match(pred, ref, want):
    assert answers_match(pred, ref) is want


def test_normalize_and_is_correct():
    assert normalize_answer(r"\left( 1 \right)") == "(1)"
    assert is_correct(r"The answer is \boxed{12}.", "12")
    assert not is_correct("The answer is 12.", "12")  # no box, no credit
    assert not is_correct(r"\boxed{12} wait, \boxed{13}", "12")  # the last box counts


def test_evaluate_problems_pass1_and_avg_k():
    # a fake generator: greedy always right for prompt [1], wrong for [2]; sampling right
    # on every other call
    calls = {"n": 0}

    def gen(prompts, sampling):
        out = []
        for p in prompts:
            if not sampling["do_sample"]:
                out.append([1] if p == [1] else [0])
            else:
                calls["n"] += 1
                out.append([1] if calls["n"] % 2 else [0])
        return out

    decode = lambda ids: r"\boxed{5}" if ids == [1] else r"\boxed{6}"
    res = evaluate_problems(gen, decode, [[1], [2]], ["5", "5"], k=4, batch_size=3)
    assert res.pass1 == 0.5
    assert res.avg_k == 0.5
    assert res.n == 2 and res.k == 4 and res.boxed_rate == 1.0
    assert res.to_dict()["avg@4"] == 0.5
    with pytest.raises(ValueError, match="empty"):
        evaluate_problems(gen, decode, [], [], k=0)


# ---------------------------------------------------------------------------------------
# math-verify equivalence (issue 12 item 6)
# ---------------------------------------------------------------------------------------

EQUIVALENT = [
    (r"\dfrac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\sqrt{2}+1", r"1+\sqrt{2}"),
    ("x=3", "3"),
    ("3", "x=3"),
    (r"\frac{1}{3}", "0.333333"),
    (r"(x+1)^2", r"x^2+2x+1"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"\left(\frac{1}{2}\right)", "1/2"),
    (r"\pi", "3.14159265358979"),
]
DIFFERENT = [
    (r"2\sqrt{3}", r"\sqrt{13}"),
    (r"\sqrt{2}-1", r"1+\sqrt{2}"),
    ("x=3", "x=4"),
    ("x=3", "4"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{\sqrt{3}}{2}"),
    ("(1,2)", "(2,1)"),
    (r"\frac{1}{3}", "0.33"),
    ("12", "21"),
]


@pytest.mark.skipif(answer_checker() != "math-verify", reason="math-verify not installed")
@pytest.mark.parametrize("pred, ref", EQUIVALENT)
def test_math_equivalent_answers_match(pred, ref):
    assert answers_match(pred, ref) is True
    assert is_correct(f"so \\boxed{{{pred}}}", ref)


@pytest.mark.parametrize("pred, ref", DIFFERENT)
def test_different_answers_do_not_match(pred, ref):
    assert answers_match(pred, ref) is False


def test_fallback_without_math_verify_warns(monkeypatch):
    monkeypatch.setattr(ev, "_MATH_VERIFY", ev._UNSET)
    monkeypatch.setitem(sys.modules, "math_verify", None)  # simulate: not installed
    with pytest.warns(RuntimeWarning, match="pip install math-verify"):
        assert answers_match("1/2", "0.5")
    assert answer_checker() == "fallback"
    # string and number equality still work; surds written differently do not
    assert answers_match(r"\dfrac{1}{2}", r"\frac{1}{2}")
    assert not answers_match(r"2\sqrt{3}", r"\sqrt{12}")
    assert not answers_match("3", "4")


@pytest.mark.skipif(answer_checker() != "math-verify", reason="math-verify not installed")
def test_math_verify_in_threads_and_pathological_input():
    pairs = EQUIVALENT + DIFFERENT
    want = [True] * len(EQUIVALENT) + [False] * len(DIFFERENT)
    # math-verify's own timeout uses signal.alarm (main thread only): in worker threads the
    # checker runs without it and must neither raise nor change its verdicts
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda pr: answers_match(*pr), pairs))
    assert got == want
    # a power tower would keep sympy busy for minutes: refused off the main thread ...
    t0 = time.perf_counter()
    out = {}
    th = threading.Thread(target=lambda: out.update(v=answers_match("10^{10^{10}}", "1")))
    th.start()
    th.join(timeout=30)
    assert not th.is_alive() and out["v"] is False
    assert time.perf_counter() - t0 < 10
    # ... and cut by the timeout on the main thread
    t0 = time.perf_counter()
    assert answers_match("10^{10^{10}}", "1", timeout_seconds=1) is False
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------------------
# evaluation data without solutions; the sampling protocol (issue 12 item 5)
# ---------------------------------------------------------------------------------------


def test_eval_records_need_no_solution(tmp_path):
    rows = [
        {"problem": "2+2?", "answer": 4},
        {"question": "3+3?", "answer": " 6 "},
        {"prompt": "1/2?", "solution": r"it is \boxed{\frac12}"},
    ]
    probs = eval_problems_from_records(rows)
    assert [p.question for p in probs] == ["2+2?", "3+3?", "1/2?"]
    assert [p.answer for p in probs] == ["4", "6", r"\frac12"]
    assert probs[0].solution == "" and probs[2].solution.startswith("it is")
    assert (
        eval_problems_from_records([{"Q": "a", "A": "1"}], question_key="Q", answer_key="A")[
            0
        ].answer
        == "1"
    )
    with pytest.raises(ValueError, match=r"row 1: missing or empty question.*'question'"):
        eval_problems_from_records([{"problem": "a", "answer": 1}, {"answer": 2}])
    with pytest.raises(ValueError, match="row 0: no 'answer'"):
        eval_problems_from_records([{"problem": "a", "solution": "no box"}])
    with pytest.raises(ValueError, match="empty"):
        eval_problems_from_records([])
    f = tmp_path / "aime.jsonl"
    f.write_text('{"problem": "p1", "answer": 70}\n\n{"problem": "p2", "answer": "588"}\n')
    assert [p.answer for p in load_eval_jsonl(f)] == ["70", "588"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p1", "answer": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_eval_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_eval_jsonl(tmp_path / "nope.jsonl")


def test_eval_prompt_and_data_together():
    from opsd_train.prompts import PromptBuilder

    p = eval_problems_from_records([{"problem": "What is 2+2?", "answer": 4}])[0]
    assert isinstance(p, Problem)
    text = PromptBuilder(None).eval_text(p)
    assert text.startswith("What is 2+2?") and "Problem:" not in text


def _recording_gen(answer_for):
    calls = []

    def gen(batch, sampling):
        calls.append(dict(sampling, n=len(batch)))
        return [answer_for(p, sampling) for p in batch]

    return gen, calls


def test_paper_preset_reaches_the_generator():
    preset = eval_preset("paper")
    assert preset == EVAL_PRESETS["paper"]
    assert (
        preset.temperature,
        preset.top_p,
        preset.top_k,
        preset.max_new_tokens,
        preset.k,
        preset.greedy,
    ) == (1.0, 0.95, 0, 38_912, 12, False)
    gen, calls = _recording_gen(lambda p, s: [p[0], 5])
    decode = lambda ids: rf"\boxed{{{ids[0]}}}"
    res = evaluate_problems(
        gen, decode, [[1], [2], [3]], ["1", "2", "9"], batch_size=8, **preset.as_kwargs()
    )
    # no greedy pass: every call samples with exactly the preset's settings
    assert calls and all(c["do_sample"] for c in calls)
    assert {(c["temperature"], c["top_p"], c["top_k"], c["max_new_tokens"]) for c in calls} == {
        (1.0, 0.95, 0, 38_912)
    }
    assert sum(c["n"] for c in calls) == 3 * 12
    assert res.pass1 is None and res.k == 12
    assert res.avg_k == pytest.approx(2 / 3) and res.pass_k == pytest.approx(2 / 3)
    assert res.score == res.avg_k and res.score_name == "avg@12"
    d = res.to_dict()
    assert "pass@1" not in d and d["avg@12"] == pytest.approx(2 / 3)
    assert d["generated_tokens"] == 3 * 12 * 2 and res.per_problem == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        eval_preset("nope")


def test_greedy_and_sampling_together():
    # greedy right for prompt [1]; samples right on every other call
    state = {"n": 0}

    def answer_for(p, s):
        if not s["do_sample"]:
            return [1] if p == [1] else [0]
        state["n"] += 1
        return [1] if state["n"] % 2 else [0, 0]

    gen, calls = _recording_gen(answer_for)
    decode = lambda ids: r"\boxed{5}" if ids == [1] else "no box"
    res = evaluate_problems(
        gen,
        decode,
        [[1], [2]],
        ["5", "5"],
        k=4,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        max_new_tokens=33,
        batch_size=3,
    )
    assert calls[0] == {"do_sample": False, "max_new_tokens": 33, "n": 2}
    assert all(c["temperature"] == 0.7 and c["top_k"] == 20 for c in calls[1:])
    assert res.pass1 == 0.5 and res.avg_k == 0.5 and res.pass_k == 1.0
    assert res.score == 0.5 and res.score_name == "pass@1"
    assert res.boxed_rate == 0.5 and res.per_problem == [1.0, 0.0]
    assert res.generated_tokens == 2 + 4 + 4 * 2  # greedy 1+1, samples 4x1 + 4x2
    # a custom checker replaces the boxed-answer check
    res2 = evaluate_problems(gen, decode, [[1], [2]], ["5", "5"], check=lambda text, ans: True)
    assert res2.pass1 == 1.0 and res2.checker == "custom"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"greedy": False, "k": 0}, "nothing to evaluate"),
        ({"k": 2, "temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"k": -1}, "k must be"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    gen = lambda batch, s: [[1] for _ in batch]
    with pytest.raises(ValueError, match=match):
        evaluate_problems(gen, str, [[1]], ["1"], **kwargs)
    if "batch_size" not in kwargs:
        with pytest.raises(ValueError, match=match):
            EvalSampling(**kwargs)


def test_generator_returning_the_wrong_number_of_completions():
    with pytest.raises(ValueError, match="returned 1 completions for 2 prompts"):
        evaluate_problems(lambda b, s: [[1]], str, [[1], [2]], ["1", "2"], batch_size=2)
