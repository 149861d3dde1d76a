"""Answer checker cases and the evaluation loop."""

from __future__ import annotations

import pytest

from opsd_train.evaluate import (
    answers_match,
    evaluate_problems,
    extract_boxed,
    is_correct,
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
