"""Data: synthetic generator (checked by re-doing its arithmetic), loaders, bad rows,
prompts."""

from __future__ import annotations

import json
import re
import sys

import pytest

from opsd_train.data import (
    Problem,
    load_hf_dataset,
    load_jsonl,
    save_jsonl,
    synthetic_problems,
    synthetic_split,
)
from opsd_train.evaluate import extract_boxed
from opsd_train.prompts import DEFAULT_TEACHER_TEMPLATE, PromptBuilder

_EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def test_synthetic_solutions_are_arithmetically_correct():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in synthetic_problems(300, seed=7):
        eqs = _EQ.findall(p.solution)
        assert 2 <= len(eqs) <= 3, p.solution
        for a, op, b, r in eqs:
            assert ops[op](int(a), int(b)) == int(r), p.solution
        # each step uses the previous result; the boxed answer is the last result
        for prev, nxt in zip(eqs, eqs[1:], strict=False):
            assert prev[3] == nxt[0]
        assert extract_boxed(p.solution) == p.answer == eqs[-1][3]
        # the question states the operands of the first step
        assert eqs[0][0] in p.question and eqs[0][2] in p.question
        assert int(p.answer) >= 0


def test_synthetic_split_is_seeded_and_disjoint():
    a_train, a_eval = synthetic_split(50, 20, seed=5)
    b_train, b_eval = synthetic_split(50, 20, seed=5)
    c_train, _ = synthetic_split(50, 20, seed=6)
    assert (a_train, a_eval) == (b_train, b_eval)
    assert a_train != c_train
    assert len(a_train) == 50 and len(a_eval) == 20
    qs = [p.question for p in a_train + a_eval]
    assert len(set(qs)) == len(qs)


def test_jsonl_roundtrip_and_custom_columns(tmp_path):
    probs = synthetic_problems(5, seed=1)
    save_jsonl(probs, tmp_path / "p.jsonl")
    assert load_jsonl(tmp_path / "p.jsonl") == probs
    rows = [{"q": "2+2?", "sol": "2 + 2 = 4. \\boxed{4}", "ans": 4}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_jsonl(tmp_path / "c.jsonl", question_key="q", solution_key="sol", answer_key="ans")
    assert got == [Problem("2+2?", "2 + 2 = 4. \\boxed{4}", "4")]


def test_jsonl_bad_rows(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: missing or empty field 'solution'"):
        load_jsonl(f)
    f.write_text(json.dumps({"question": "x", "solution": "1"}) + "\n")
    with pytest.raises(ValueError, match="no 'answer' field"):
        load_jsonl(f)
    f.write_text(json.dumps({"question": "x", "solution": "so \\boxed{7}"}) + "\n")
    assert load_jsonl(f)[0].answer == "7"  # documented: taken from the last \boxed{}
    f.write_text('{"question": "x", "solution": "y", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(f)
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(f)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_hf_loader_without_datasets_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # simulate: not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("some/dataset")


def test_prompts_student_and_teacher():
    from opsd_train.tiny import build_tokenizer

    tok = build_tokenizer()
    p = synthetic_problems(1, seed=0)[0]
    pb = PromptBuilder(tok)
    s = tok.decode(pb.student_ids(p))
    t = tok.decode(pb.teacher_ids(p))
    assert p.question in s and p.solution not in s
    assert p.question in t and p.solution in t
    assert s.startswith("<|im_start|>user\n") and s.endswith("<|im_start|>assistant\n")
    raw = PromptBuilder(tok, use_chat_template=False)
    assert tok.decode(raw.student_ids(p)) == raw.student_text(p)
    custom = PromptBuilder(tok, "Q: {problem}", "Q: {problem} S: {solution}")
    assert custom.student_text(p) == f"Q: {p.question}"
    with pytest.raises(ValueError, match="solution"):
        PromptBuilder(tok, teacher_template="{problem} only")
    assert "{solution}" in DEFAULT_TEACHER_TEMPLATE


def test_deviated_solution_is_self_consistent():
    import random

    from opsd_train.demo import deviated_solution

    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    rng = random.Random(0)
    n = 0
    for p in synthetic_problems(200, seed=9):
        parts = deviated_solution(p, rng)
        if parts is None:
            continue
        n += 1
        before, wrong, after = parts
        text = before + wrong + after
        eqs = _EQ.findall(text)
        ref = _EQ.findall(p.solution)
        assert len(eqs) == len(ref)
        k = len(_EQ.findall(before + wrong)) - 1  # the deviating step
        a, op, b, r = eqs[k]
        assert int(r) == int(wrong) and int(r) != ops[op](int(a), int(b))
        for a, op, b, r in eqs[k + 1 :]:  # later steps: correct arithmetic on the new chain
            assert ops[op](int(a), int(b)) == int(r)
        for prev, nxt in zip(eqs, eqs[1:], strict=False):
            assert prev[3] == nxt[0]
        assert extract_boxed(text) == eqs[-1][3] != p.answer
    assert n > 150
