"""Student, teacher and evaluation prompts, rendered the way the OPSD reference code does.

Three user messages, each a template with placeholders:

- **student** (``{problem}``): the problem and the step-by-step / ``\\boxed{}`` instruction.
  Rendered **non-thinking** (``enable_thinking=False``): with Qwen3's chat template the
  prompt ends in an empty ``<think></think>`` block, so a short rollout is an answer rather
  than a truncated think trace.
- **teacher** (``{problem}``, ``{solution}``): the problem, the reference solution between
  explicit begin/end markers, then an instruction to understand that reasoning without
  copying or paraphrasing it, to derive the answer independently step by step, and to box
  it. Rendered **thinking** (``enable_thinking=True``: an open assistant turn); the student's
  completion is appended right after the teacher's assistant header.
- **eval** (``{problem}``): the problem, then the same instruction, without the
  ``Problem:`` prefix, rendered thinking (the reference evaluation protocol).

The thinking flags are passed to the tokenizer's chat template as ``enable_thinking``;
templates that do not read that variable (most non-Qwen3 models, the embedded tiny model)
render the same text either way. ``None`` passes no flag (the template's own default).

Templates are literal text: only ``{problem}`` and ``{solution}`` are substituted, any other
brace is kept as written (so ``\\boxed{}`` needs no escaping). :func:`load_template`
reads ``@path`` arguments (the CLI's ``--teacher-template @file``).

>>> from opsd_train.data import Problem
>>> pb = PromptBuilder(None, use_chat_template=False)
>>> print(pb.student_text(Problem("1+1?", "1+1=2. \\\\boxed{2}", "2")))
Problem: 1+1?
<BLANKLINE>
Please reason step by step, and put your final answer within \\boxed{}.
>>> print(pb.eval_text(Problem("1+1?", "", "2")))
1+1?
<BLANKLINE>
Please reason step by step, and put your final answer within \\boxed{}.
"""

from __future__ import annotations

import re
from pathlib import Path

from .data import Problem

__all__ = [
    "DEFAULT_STUDENT_TEMPLATE",
    "DEFAULT_TEACHER_TEMPLATE",
    "DEFAULT_EVAL_TEMPLATE",
    "BOXED_INSTRUCTION",
    "SOLUTION_BEGIN",
    "SOLUTION_END",
    "PromptBuilder",
    "fill_template",
    "load_template",
]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SOLUTION_BEGIN = "[BEGIN REFERENCE SOLUTION]"
SOLUTION_END = "[END REFERENCE SOLUTION]"

DEFAULT_STUDENT_TEMPLATE = "Problem: {problem}\n\n" + BOXED_INSTRUCTION
DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "A worked reference solution to this problem is given between the markers below.\n"
    f"{SOLUTION_BEGIN}\n{{solution}}\n{SOLUTION_END}\n\n"
    "Read the reference solution until you understand why each of its steps works. Do not "
    "copy it and do not restate it in other words. Then solve the problem on your own: reason "
    "independently, step by step, and arrive at the same final answer.\n\n" + BOXED_INSTRUCTION
)
DEFAULT_EVAL_TEMPLATE = "{problem}\n\n" + BOXED_INSTRUCTION

_FIELDS = {"student": ("problem",), "teacher": ("problem", "solution"), "eval": ("problem",)}


def fill_template(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders; every other character is kept literally.

    Unlike ``str.format`` this leaves LaTeX braces alone and never re-reads substituted text
    (a problem that itself contains ``{solution}`` stays as it is).

    >>> fill_template(r"Q: {problem} \\boxed{}", problem="x{1}")
    'Q: x{1} \\\\boxed{}'
    """
    if not values:
        return template
    placeholders = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return placeholders.sub(lambda m: str(values[m.group(0)[1:-1]]), template)


def load_template(value: str | None) -> str | None:
    """A template given on the command line: ``@path`` reads the file (UTF-8, one trailing
    newline dropped), ``@@text`` is the literal ``@text``, anything else is returned as is.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file when it is missing, not
    UTF-8 text, or empty.

    >>> load_template("Q: {problem}"), load_template("@@home"), load_template(None)
    ('Q: {problem}', '@home', None)
    """
    if value is None or not value.startswith("@"):
        return value
    if value.startswith("@@"):
        return value[1:]
    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"template file not found: {path} (from {value!r})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"template file {path} is not UTF-8 text ({e.reason})") from e
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise ValueError(f"template file {path} is empty")
    return text


class PromptBuilder:
    """Render and tokenize student, teacher and evaluation prompts.

    ``tokenizer`` may be ``None`` for text-only use. With ``use_chat_template`` (default)
    and a tokenizer that has a chat template, each prompt is one user turn followed by the
    assistant generation prompt; ``student_thinking``, ``teacher_thinking`` and
    ``eval_thinking`` are passed to the template as ``enable_thinking`` (``None``: not
    passed). Without a chat template the raw text is used and the flags have no effect.

    The defaults reproduce the reference: student non-thinking, teacher and evaluation
    thinking. Templates must contain ``{problem}`` (and the teacher's ``{solution}``).
    """

    def __init__(
        self,
        tokenizer,
        student_template: str = DEFAULT_STUDENT_TEMPLATE,
        teacher_template: str = DEFAULT_TEACHER_TEMPLATE,
        use_chat_template: bool = True,
        *,
        eval_template: str = DEFAULT_EVAL_TEMPLATE,
        student_thinking: bool | None = False,
        teacher_thinking: bool | None = True,
        eval_thinking: bool | None = True,
    ):
        templates = {
            "student": student_template,
            "teacher": teacher_template,
            "eval": eval_template,
        }
        for role, tpl in templates.items():
            if not isinstance(tpl, str):
                raise TypeError(f"{role}_template must be a str, got {type(tpl).__name__}")
            for key in _FIELDS[role]:
                if "{" + key + "}" not in tpl:
                    raise ValueError(f"{role}_template must contain the placeholder {{{key}}}")
        for name, flag in (
            ("student_thinking", student_thinking),
            ("teacher_thinking", teacher_thinking),
            ("eval_thinking", eval_thinking),
        ):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name} must be True, False or None, got {flag!r}")
        self.tokenizer = tokenizer
        self.student_template = student_template
        self.teacher_template = teacher_template
        self.eval_template = eval_template
        self.thinking = {
            "student": student_thinking,
            "teacher": teacher_thinking,
            "eval": eval_thinking,
        }
        has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
        self.use_chat_template = bool(use_chat_template and has_template)

    # ------------------------------------------------------------------ user messages
    def student_text(self, problem: Problem) -> str:
        """The student's user message (before the chat template)."""
        return fill_template(self.student_template, problem=problem.question)

    def teacher_text(self, problem: Problem) -> str:
        """The teacher's user message: problem plus reference solution."""
        return fill_template(
            self.teacher_template, problem=problem.question, solution=problem.solution
        )

    def eval_text(self, problem: Problem) -> str:
        """The evaluation user message (needs only ``problem.question``)."""
        return fill_template(self.eval_template, problem=problem.question)

    # ------------------------------------------------------------------ full prompts
    def render(self, text: str, role: str) -> str:
        """``text`` as the full prompt string of ``role`` (``"student"``, ``"teacher"`` or
        ``"eval"``): wrapped in the chat template with that role's thinking flag, or as is."""
        if role not in self.thinking:
            raise ValueError(f"role must be 'student', 'teacher' or 'eval', got {role!r}")
        if not self.use_chat_template:
            return text
        kwargs = {}
        if self.thinking[role] is not None:
            kwargs["enable_thinking"] = self.thinking[role]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )

    def student_prompt(self, problem: Problem) -> str:
        """The full student prompt string (chat template applied)."""
        return self.render(self.student_text(problem), "student")

    def teacher_prompt(self, problem: Problem) -> str:
        """The full teacher prompt string; the student's completion follows it directly."""
        return self.render(self.teacher_text(problem), "teacher")

    def eval_prompt(self, problem: Problem) -> str:
        """The full evaluation prompt string."""
        return self.render(self.eval_text(problem), "eval")

    def _ids(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("PromptBuilder needs a tokenizer to produce token ids")
        # the chat template already holds any BOS it wants; raw text gets the tokenizer's own
        ids = self.tokenizer(prompt, add_special_tokens=not self.use_chat_template)
        return list(ids["input_ids"])

    def student_ids(self, problem: Problem) -> list[int]:
        """Token ids of the full student prompt (ready for generation)."""
        return self._ids(self.student_prompt(problem))

    def teacher_ids(self, problem: Problem) -> list[int]:
        """Token ids of the full teacher prompt (the completion's ids are appended to it)."""
        return self._ids(self.teacher_prompt(problem))

    def eval_ids(self, problem: Problem) -> list[int]:
        """Token ids of the full evaluation prompt."""
        return self._ids(self.eval_prompt(problem))
