"""Student and teacher prompts (the templates of the OPSD reference code).

The student sees only the problem; the teacher also sees the reference solution. Both go
through the tokenizer's chat template when it has one; both templates are overridable
(``{problem}`` and, for the teacher, ``{solution}`` are substituted).

>>> from opsd_train.data import Problem
>>> pb = PromptBuilder(None, use_chat_template=False)
>>> print(pb.student_text(Problem("1+1?", "1+1=2. \\\\boxed{2}", "2")))
Problem: 1+1?
<BLANKLINE>
Please reason step by step, and put your final answer within \\boxed{}.
"""

from __future__ import annotations

from .data import Problem

__all__ = ["DEFAULT_STUDENT_TEMPLATE", "DEFAULT_TEACHER_TEMPLATE", "PromptBuilder"]

DEFAULT_STUDENT_TEMPLATE = (
    "Problem: {problem}\n\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}."
)
DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "After understanding the reference solution, please solve the problem yourself. "
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)


class PromptBuilder:
    """Render and tokenize student/teacher prompts.

    ``tokenizer`` may be ``None`` for text-only use. With ``use_chat_template`` (default)
    and a tokenizer that has a chat template, the prompt is wrapped as one user turn with the
    assistant generation prompt appended; otherwise the raw text is used.
    """

    def __init__(
        self,
        tokenizer,
        student_template: str = DEFAULT_STUDENT_TEMPLATE,
        teacher_template: str = DEFAULT_TEACHER_TEMPLATE,
        use_chat_template: bool = True,
    ):
        for name, tpl, keys in (
            ("student_template", student_template, ["problem"]),
            ("teacher_template", teacher_template, ["problem", "solution"]),
        ):
            for key in keys:
                if "{" + key + "}" not in tpl:
                    raise ValueError(f"{name} must contain the placeholder {{{key}}}")
        self.tokenizer = tokenizer
        self.student_template = student_template
        self.teacher_template = teacher_template
        has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
        self.use_chat_template = bool(use_chat_template and has_template)

    def student_text(self, problem: Problem) -> str:
        """The student's user message (before the chat template)."""
        return self.student_template.format(problem=problem.question)

    def teacher_text(self, problem: Problem) -> str:
        """The teacher's user message: problem plus reference solution."""
        return self.teacher_template.format(problem=problem.question, solution=problem.solution)

    def _wrap(self, text: str) -> str:
        if not self.use_chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def _ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("PromptBuilder needs a tokenizer to produce token ids")
        ids = self.tokenizer(self._wrap(text), add_special_tokens=not self.use_chat_template)
        return list(ids["input_ids"])

    def student_ids(self, problem: Problem) -> list[int]:
        """Token ids of the full student prompt (ready for generation)."""
        return self._ids(self.student_text(problem))

    def teacher_ids(self, problem: Problem) -> list[int]:
        """Token ids of the full teacher prompt."""
        return self._ids(self.teacher_text(problem))
