"""Answer checking and held-out evaluation.

The checker takes the **last** ``\\boxed{...}`` of a completion (braces may nest),
normalises both sides and compares them as strings, then numerically (integers, decimals,
fractions ``a/b`` and ``\\frac{a}{b}``, thousands separators, percent signs).

>>> extract_boxed(r"first \\boxed{1}, finally \\boxed{\\frac{1}{2}}")
'\\\\frac{1}{2}'
>>> answers_match(r"\\frac{1}{2}", "0.5"), answers_match("1,000", "1000"), answers_match("3", "4")
(True, True, False)
>>> is_correct(r"so the answer is \\boxed{ 12 }.", "12")
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "extract_boxed",
    "normalize_answer",
    "parse_number",
    "answers_match",
    "is_correct",
    "EvalResult",
    "evaluate_problems",
]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; ``None`` if
    there is none or its braces never close.

    >>> extract_boxed("no box") is None
    True
    >>> extract_boxed(r"\\boxed{a{b}c} and \\boxed{7")  # the last one is unclosed
    'a{b}c'
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer: strips ``$``, spaces, ``\\left``/``\\right``,
    ``\\text{}`` wrappers, a trailing period, thousands separators, and turns
    ``\\dfrac``/``\\tfrac`` into ``\\frac``.

    >>> normalize_answer(r" $\\text{12}$. ")
    '12'
    >>> normalize_answer(r"\\dfrac{3}{4}")
    '\\\\frac{3}{4}'
    """
    s = s.strip()
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if s.startswith("+"):
        s = s[1:]
    return s


def parse_number(s: str) -> Fraction | float | None:
    """Parse a normalised answer as an exact number when possible.

    Handles integers, decimals, ``a/b``, ``\\frac{a}{b}``, a trailing ``%`` (as a
    percentage) and scientific notation; returns ``None`` otherwise.

    >>> parse_number("3/4"), parse_number(r"\\frac{-1}{2}"), parse_number("x")
    (Fraction(3, 4), Fraction(-1, 2), None)
    """
    s = normalize_answer(s)
    if not s:
        return None
    pct = s.endswith("%") or s.endswith("\\%")
    if pct:
        s = s[:-2] if s.endswith("\\%") else s[:-1]
    m = _FRAC_RE.fullmatch(s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    neg = False
    if s.startswith("-") and _FRAC_RE.fullmatch(s[1:]):
        m = _FRAC_RE.fullmatch(s[1:])
        s, neg = f"{m.group(1)}/{m.group(2)}", True
    try:
        if re.fullmatch(r"[-+]?\d+(\.\d+)?\s*/\s*[-+]?\d+(\.\d+)?", s):
            num, den = (Fraction(x.strip()) for x in s.split("/"))
            if den == 0:
                return None
            val: Fraction | float = num / den
        elif re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", s):
            val = Fraction(s)
        elif re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", s):
            val = float(s)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    if neg:
        val = -val
    if pct:
        val = val / 100
    return val


def answers_match(pred: str | None, ref: str, rel_tol: float = 1e-6) -> bool:
    """Whether a predicted answer equals the reference: equal after normalisation, or equal
    as numbers (exactly for rationals, within ``rel_tol`` otherwise). ``None`` never matches.
    """
    if pred is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(ref)
    if a == b and a != "":
        return True
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    return math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-12)


def is_correct(completion: str, answer: str) -> bool:
    """Whether the last ``\\boxed{}`` of ``completion`` matches ``answer``."""
    return answers_match(extract_boxed(completion), answer)


@dataclass
class EvalResult:
    """Accuracy of one evaluation pass.

    ``pass1`` is greedy-decoding accuracy (pass@1); ``avg_k`` is the mean accuracy over
    ``k`` sampled completions per problem (avg@k; ``None`` when ``k == 0``);
    ``mean_len`` is the mean completion length in tokens of the greedy pass.
    """

    pass1: float
    avg_k: float | None
    k: int
    n: int
    mean_len: float
    boxed_rate: float
    samples: list[dict]

    def to_dict(self) -> dict:
        """The metrics (without the samples) as a dict (``avg@k`` only when ``k > 0``)."""
        out = {"pass@1": self.pass1}
        if self.k > 0:
            out[f"avg@{self.k}"] = self.avg_k
        out.update(n=self.n, mean_len=self.mean_len, boxed_rate=self.boxed_rate)
        return out


def evaluate_problems(
    generate: Callable[[list[list[int]], dict], list[list[int]]],
    decode: Callable[[list[int]], str],
    prompts: Sequence[list[int]],
    answers: Sequence[str],
    *,
    k: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    n_samples_kept: int = 4,
) -> EvalResult:
    """Score prompts against reference answers.

    ``generate(prompt_ids, sampling)`` returns one completion per prompt, where
    ``sampling`` is a dict with ``do_sample``, ``temperature``, ``top_p``, ``top_k`` and
    ``max_new_tokens`` (a :class:`opsd_train.rollout.RolloutEngine` provides one).
    Greedy decoding gives pass@1; ``k > 0`` adds avg@k from ``k`` samples per prompt.
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if not prompts:
        raise ValueError("nothing to evaluate: the evaluation set is empty")

    def run(sampling: dict, reps: int) -> list[list[int]]:
        outs: list[list[int]] = []
        expanded = [p for p in prompts for _ in range(reps)]
        for i in range(0, len(expanded), batch_size):
            outs.extend(generate(expanded[i : i + batch_size], sampling))
        return outs

    greedy = run({"do_sample": False, "max_new_tokens": max_new_tokens}, 1)
    texts = [decode(c) for c in greedy]
    correct = [is_correct(t, a) for t, a in zip(texts, answers, strict=True)]
    boxed = [extract_boxed(t) is not None for t in texts]
    samples = [
        {"completion": t, "answer": a, "correct": c}
        for t, a, c in list(zip(texts, answers, correct, strict=True))[:n_samples_kept]
    ]
    avg_k = None
    if k > 0:
        sampling = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
        }
        sampled = run(sampling, k)
        hits = [
            is_correct(decode(c), answers[i // k]) for i, c in enumerate(sampled)
        ]
        avg_k = sum(hits) / len(hits)
    return EvalResult(
        pass1=sum(correct) / len(correct),
        avg_k=avg_k,
        k=k,
        n=len(prompts),
        mean_len=sum(len(c) for c in greedy) / len(greedy),
        boxed_rate=sum(boxed) / len(boxed),
        samples=samples,
    )
