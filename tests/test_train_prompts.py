"""Prompts: thinking flags through the chat template, teacher prompt structure, templates
from files."""

from __future__ import annotations

import copy

import pytest

from opsd_train.data import Problem
from opsd_train.prompts import (
    BOXED_INSTRUCTION,
    DEFAULT_TEACHER_TEMPLATE,
    SOLUTION_BEGIN,
    SOLUTION_END,
    PromptBuilder,
    fill_template,
    load_template,
)
from opsd_train.tiny import build_tokenizer

# Modelled on Qwen3's chat template: the generation prompt opens an assistant turn; when the
# caller passes enable_thinking=False it also writes an empty think block, so the model
# answers without thinking. Without the flag thinking is on (Qwen3's default).
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
OPEN_TURN = "<|im_start|>assistant\n"
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

PROBLEM = Problem(
    "Ann has 3 pens and gets 4 more. How many pens?", "3 + 4 = 7. The answer is \\boxed{7}.", "7"
)


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tokenizer(extra_texts=["<think> </think>"])


@pytest.fixture(scope="module")
def qwen_tok(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    return tok


def test_thinking_flags_reach_a_template_that_honours_them(qwen_tok):
    pb = PromptBuilder(qwen_tok)
    s, t, e = pb.student_prompt(PROBLEM), pb.teacher_prompt(PROBLEM), pb.eval_prompt(PROBLEM)
    # student non-thinking: the prompt ends in an empty think block
    assert s.endswith(EMPTY_THINK)
    assert s == f"<|im_start|>user\n{pb.student_text(PROBLEM)}<|im_end|>\n{EMPTY_THINK}"
    # teacher and evaluation thinking: an open assistant turn, no think block
    assert t.endswith(OPEN_TURN) and "<think>" not in t
    assert e.endswith(OPEN_TURN) and "<think>" not in e
    assert t == f"<|im_start|>user\n{pb.teacher_text(PROBLEM)}<|im_end|>\n{OPEN_TURN}"
    # the flags are per role and overridable; None leaves the template's default (on)
    flipped = PromptBuilder(
        qwen_tok, student_thinking=True, teacher_thinking=False, eval_thinking=False
    )
    assert flipped.student_prompt(PROBLEM).endswith(OPEN_TURN)
    assert flipped.teacher_prompt(PROBLEM).endswith(EMPTY_THINK)
    assert flipped.eval_prompt(PROBLEM).endswith(EMPTY_THINK)
    unset = PromptBuilder(qwen_tok, student_thinking=None, teacher_thinking=None)
    assert unset.student_prompt(PROBLEM).endswith(OPEN_TURN)
    assert "<think>" not in unset.student_prompt(PROBLEM)


def test_token_ids_follow_the_rendered_prompts(qwen_tok):
    pb = PromptBuilder(qwen_tok)
    s_ids = pb.student_ids(PROBLEM)
    assert qwen_tok.decode(s_ids) == pb.student_prompt(PROBLEM)
    assert qwen_tok.unk_token_id not in s_ids
    # the teacher scores the student's completion appended right after its assistant header
    completion = qwen_tok(" 3 + 4 = 7. The answer is \\boxed{7}.", add_special_tokens=False)[
        "input_ids"
    ] + [qwen_tok.eos_token_id]
    t_ids = pb.teacher_ids(PROBLEM)
    seq = qwen_tok.decode(t_ids + completion)
    assert seq == pb.teacher_prompt(PROBLEM) + qwen_tok.decode(completion)
    assert seq.split(OPEN_TURN)[-1] == qwen_tok.decode(completion)


def test_template_that_ignores_the_flag(tiny_tok):
    # the embedded tokenizer's template never reads enable_thinking: same text either way
    pb = PromptBuilder(tiny_tok)
    plain = tiny_tok.apply_chat_template(
        [{"role": "user", "content": pb.student_text(PROBLEM)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert pb.student_prompt(PROBLEM) == plain
    assert pb.student_prompt(PROBLEM).endswith(OPEN_TURN)
    assert pb.teacher_prompt(PROBLEM).endswith(OPEN_TURN)
    assert PromptBuilder(tiny_tok, student_thinking=True).student_ids(PROBLEM) == pb.student_ids(
        PROBLEM
    )
    # without a chat template the raw text is the prompt and the flags do nothing
    raw = PromptBuilder(tiny_tok, use_chat_template=False)
    assert raw.student_prompt(PROBLEM) == raw.student_text(PROBLEM)
    assert tiny_tok.decode(raw.eval_ids(PROBLEM)) == raw.eval_text(PROBLEM)


def test_teacher_prompt_structure():
    pb = PromptBuilder(None)
    text = pb.teacher_text(PROBLEM)
    i_problem = text.index(PROBLEM.question)
    i_begin, i_end = text.index(SOLUTION_BEGIN), text.index(SOLUTION_END)
    assert i_problem < i_begin < i_end
    # the solution, verbatim and alone, between the markers
    assert text[i_begin + len(SOLUTION_BEGIN) : i_end].strip("\n") == PROBLEM.solution
    after = text[i_end:]
    for phrase in (
        "understand",
        "Do not copy",
        "in other words",
        "independently",
        "step by step",
        "same final answer",
    ):
        assert phrase in after, phrase
    assert after.endswith(BOXED_INSTRUCTION) and "\\boxed{}" in after
    # the student and eval prompts never see the solution; eval has no "Problem:" prefix
    assert PROBLEM.solution not in pb.student_text(PROBLEM)
    assert pb.student_text(PROBLEM).startswith("Problem: ")
    assert pb.eval_text(PROBLEM).startswith(PROBLEM.question)
    assert pb.eval_text(PROBLEM).endswith(BOXED_INSTRUCTION)
    # the eval prompt needs no solution
    assert pb.eval_text(Problem(PROBLEM.question, "", "7")) == pb.eval_text(PROBLEM)


def test_fill_template_is_literal():
    tpl = r"P={problem} S={solution} \boxed{} {other} {{x}}"
    out = fill_template(tpl, problem="a{solution}b", solution=r"\frac{1}{2}")
    # substituted text is not re-read; unknown braces are kept
    assert out == r"P=a{solution}b S=\frac{1}{2} \boxed{} {other} {{x}}"
    pb = PromptBuilder(None, "Q {problem} \\boxed{}", "T {problem} | {solution}")
    assert pb.student_text(PROBLEM) == f"Q {PROBLEM.question} \\boxed{{}}"
    assert pb.teacher_text(PROBLEM) == f"T {PROBLEM.question} | {PROBLEM.solution}"


def test_load_template_from_file(tmp_path):
    f = tmp_path / "teacher.txt"
    f.write_text("Q: {problem}\nRef:\n{solution}\nBox it: \\boxed{}\n", encoding="utf-8")
    tpl = load_template(f"@{f}")
    assert tpl == "Q: {problem}\nRef:\n{solution}\nBox it: \\boxed{}"  # one newline dropped
    pb = PromptBuilder(None, teacher_template=tpl)
    assert pb.teacher_text(PROBLEM).endswith("Box it: \\boxed{}")
    assert load_template("plain {problem}") == "plain {problem}"
    assert load_template("@@literal") == "@literal"
    assert load_template(None) is None
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_template(f"@{tmp_path / 'missing.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_template(f"@{empty}")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bin.txt.*UTF-8"):
        load_template(f"@{binary}")
    with pytest.raises(FileNotFoundError, match="template file"):
        load_template(f"@{tmp_path}")  # a directory is not a template file


def test_bad_arguments():
    with pytest.raises(ValueError, match="teacher_template.*solution"):
        PromptBuilder(None, teacher_template="{problem} only")
    with pytest.raises(ValueError, match="student_template.*problem"):
        PromptBuilder(None, student_template="no placeholder")
    with pytest.raises(ValueError, match="eval_template.*problem"):
        PromptBuilder(None, eval_template="nothing")
    with pytest.raises(TypeError, match="student_thinking"):
        PromptBuilder(None, student_thinking="no")
    with pytest.raises(ValueError, match="role"):
        PromptBuilder(None).render("x", "critic")
    with pytest.raises(ValueError, match="tokenizer"):
        PromptBuilder(None).student_ids(PROBLEM)
    assert "{solution}" in DEFAULT_TEACHER_TEMPLATE
