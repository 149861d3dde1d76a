"""Answer checking, evaluation data and held-out evaluation.

**Checking.** The checker takes the **last** ``\\boxed{...}`` of a completion (braces may
nest). :func:`answers_match` decides equality with the ``math-verify`` library (parse both
sides as LaTeX, then ``verify(reference, prediction)``, as the OPSD reference evaluation
does), after two cheap exact tests: equal normalised strings, and equal plain numbers.
Without ``math-verify`` it falls back to string and number comparison and warns once.

**Data.** Evaluation sets need a question and an answer, no solution
(:func:`load_eval_jsonl`, :func:`eval_problems_from_records`).

**Protocol.** :func:`evaluate_problems` takes the sampling settings as arguments; greedy
pass@1 is optional and avg@k samples ``k`` completions per problem. ``EVAL_PRESETS["paper"]``
holds the reference protocol (T 1.0, top-p 0.95, no top-k, 38,912 new tokens, avg@12, no
greedy pass); the prompt side (no ``Problem:`` prefix, thinking on) is
:meth:`opsd_train.prompts.PromptBuilder.eval_ids`.

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
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from .data import Problem, extract_boxed, load_jsonl, problems_from_records

__all__ = [
    "extract_boxed",
    "normalize_answer",
    "parse_number",
    "answers_match",
    "answer_checker",
    "is_correct",
    "EvalSampling",
    "EVAL_PRESETS",
    "eval_preset",
    "eval_problems_from_records",
    "load_eval_jsonl",
    "EvalResult",
    "evaluate_problems",
    "hf_generate",
]

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


# ---------------------------------------------------------------------------------------
# Equality of answers
# ---------------------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Inputs that can make sympy work for minutes (a tower of powers, a huge power or
# factorial). Only screened where math-verify's signal-based timeout cannot run.
_RISKY_RE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{5,}|\d{4,}\s*!|\*\*\s*\(?[^)]*\*\*")
_MAX_UNGUARDED_LEN = 300

_UNSET = object()
_MATH_VERIFY = _UNSET  # the imported module, None when it is missing, _UNSET before looking


def _math_verify():
    global _MATH_VERIFY
    if _MATH_VERIFY is _UNSET:
        try:
            import math_verify
        except ImportError:
            math_verify = None
            warnings.warn(
                "math-verify is not installed: answers are compared as normalised strings and "
                "plain numbers only, so equal expressions written differently (2\\sqrt{3} vs "
                "\\sqrt{12}) count as wrong. Install it: pip install math-verify",
                RuntimeWarning,
                stacklevel=3,
            )
        _MATH_VERIFY = math_verify
    return _MATH_VERIFY


def answer_checker() -> str:
    """The equality backend in use: ``"math-verify"`` or ``"fallback"`` (strings and plain
    numbers; used only when the library is missing).

    >>> answer_checker() in ("math-verify", "fallback")
    True
    """
    return "math-verify" if _math_verify() is not None else "fallback"


def _numbers_equal(x: Fraction | float, y: Fraction | float, rel_tol: float) -> bool:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    return math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-12)


def _legacy_match(a: str, b: str, rel_tol: float) -> bool:
    """Equal normalised strings, or equal numbers (``parse_number``)."""
    if a == b:
        return a != ""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and _numbers_equal(x, y, rel_tol)


def _math_verify_match(mv, pred: str, ref: str, timeout_seconds: int | None) -> bool | None:
    """``verify(parse(ref), parse(pred))``; ``None`` when a side does not parse or the input
    is unsafe to run without a timeout."""
    # math-verify's timeout is signal.alarm, which only the main thread may set: elsewhere
    # run without it and refuse inputs that could run for minutes instead.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = timeout_seconds if in_main else None
    if not in_main:
        for s in (pred, ref):
            if len(s) > _MAX_UNGUARDED_LEN or _RISKY_RE.search(s):
                return None
    wrap = lambda s: s if "$" in s else f"${s}$"
    gold = mv.parse(wrap(ref), fallback_mode="no_fallback", parsing_timeout=timeout)
    target = mv.parse(wrap(pred), fallback_mode="no_fallback", parsing_timeout=timeout)
    if not gold or not target:
        return None
    return bool(mv.verify(gold, target, timeout_seconds=timeout))


def answers_match(
    pred: str | None, ref: str | None, rel_tol: float = 1e-6, *, timeout_seconds: int = 5
) -> bool:
    """Whether a predicted answer equals the reference answer (both without ``\\boxed``).

    In order: equal after :func:`normalize_answer` (a cheap exact test); both plain numbers
    (integers, decimals, scientific notation: compared exactly); otherwise math-verify
    decides (``verify(reference, prediction)``, float rounding to 6 digits), and exact
    number equality (:func:`parse_number`: fractions, percentages) can only add a match.
    When math-verify cannot parse a side, or is not installed (a warning says so once),
    string and number equality decide alone. ``None`` or an empty answer never matches.

    ``timeout_seconds`` bounds each math-verify parse and comparison in the main thread
    (math-verify uses ``signal.alarm``). In other threads there is no timeout; inputs that
    could run for minutes (power towers, huge exponents or factorials, over 300 characters)
    then skip math-verify and get the string/number test.

    With math-verify, ``answers_match(r"2\\sqrt{3}", r"\\sqrt{12}")``,
    ``answers_match(r"\\dfrac{\\sqrt3}{2}", r"\\frac{\\sqrt{3}}{2}")`` and
    ``answers_match("x=3", "3")`` are true (tests/test_train_evaluate.py); these hold either way:

    >>> answers_match(r"\\dfrac{3}{4}", "0.75"), answers_match("7", "8")
    (True, False)
    """
    if pred is None or ref is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not a or not b:
        return False
    if a == b:
        return True
    if _PLAIN_NUMBER_RE.fullmatch(a) and _PLAIN_NUMBER_RE.fullmatch(b):
        x, y = parse_number(a), parse_number(b)
        if x is not None and y is not None:
            return _numbers_equal(x, y, rel_tol)
    legacy = _legacy_match(a, b, rel_tol)
    mv = _math_verify()
    if mv is None or legacy:
        return legacy
    verdict = _math_verify_match(mv, pred.strip(), ref.strip(), timeout_seconds)
    return bool(verdict)


def is_correct(completion: str, answer: str) -> bool:
    """Whether the last ``\\boxed{}`` of ``completion`` matches ``answer``."""
    return answers_match(extract_boxed(completion), answer)


# ---------------------------------------------------------------------------------------
# Evaluation data: a question and an answer, no solution needed
# ---------------------------------------------------------------------------------------


def eval_problems_from_records(records: Iterable[dict], **keys) -> list[Problem]:
    """Evaluation problems from mapping rows: a question (``question``, ``problem`` or
    ``prompt`` unless ``question_key`` names it) and an answer (or a solution with a
    ``\\boxed{}`` answer) per row; a solution is kept when present, never required.

    >>> [p.answer for p in eval_problems_from_records([{"problem": "2+2?", "answer": 4}])]
    ['4']
    """
    return problems_from_records(records, **{"question_key": None, **keys, "need_solution": False})


def load_eval_jsonl(path: str | Path, **keys) -> list[Problem]:
    """Evaluation problems from a JSON-lines file (see :func:`eval_problems_from_records`)."""
    return load_jsonl(path, **{"question_key": None, **keys, "need_solution": False})


# ---------------------------------------------------------------------------------------
# The protocol: sampling settings and the evaluation loop
# ---------------------------------------------------------------------------------------


def _check_sampling(temperature, top_p, top_k, max_new_tokens, k, greedy) -> None:
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not greedy and k == 0:
        raise ValueError("nothing to evaluate: greedy=False and k=0 (set k > 0 for avg@k)")
    if k > 0 and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (k > 0), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


@dataclass(frozen=True)
class EvalSampling:
    """Sampling settings of one evaluation: ``k`` sampled completions per problem (avg@k)
    at ``temperature``/``top_p``/``top_k`` (``top_k=0`` and ``top_p=1`` disable those
    filters), up to ``max_new_tokens`` each, plus a greedy pass (pass@1) when ``greedy``.
    ``as_kwargs()`` gives the keyword arguments of :func:`evaluate_problems`.

    >>> EVAL_PRESETS["paper"].as_kwargs()["max_new_tokens"]
    38912
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    k: int = 0
    greedy: bool = True

    def __post_init__(self):
        _check_sampling(
            self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.k, self.greedy
        )

    def as_kwargs(self) -> dict:
        """The settings as keyword arguments of :func:`evaluate_problems`."""
        return asdict(self)


EVAL_PRESETS: dict[str, EvalSampling] = {
    # the OPSD reference evaluation: T 1.0, top-p 0.95, top-k off, 38,912 new tokens, avg@12
    "paper": EvalSampling(
        temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38_912, k=12, greedy=False
    ),
}


def eval_preset(name: str) -> EvalSampling:
    """The named evaluation preset (``ValueError`` listing the names otherwise)."""
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; known: {sorted(EVAL_PRESETS)}")
    return EVAL_PRESETS[name]


@dataclass
class EvalResult:
    """Accuracy of one evaluation.

    ``pass1``: greedy-decoding accuracy (pass@1), ``None`` without a greedy pass.
    ``avg_k``: mean accuracy over ``k`` sampled completions per problem (avg@k) and
    ``pass_k``: share of problems with at least one correct sample (pass@k); both ``None``
    when ``k == 0``. ``mean_len`` and ``boxed_rate`` describe the greedy completions when
    there are some, else the sampled ones. ``generated_tokens`` counts every completion
    token of the evaluation; ``per_problem`` is each problem's accuracy (greedy, or over
    its samples when there is no greedy pass).
    """

    pass1: float | None
    avg_k: float | None
    k: int
    n: int
    mean_len: float
    boxed_rate: float
    samples: list[dict]
    pass_k: float | None = None
    generated_tokens: int = 0
    per_problem: list[float] = field(default_factory=list)
    checker: str = ""

    @property
    def score(self) -> float:
        """The headline accuracy: pass@1 when there was a greedy pass, else avg@k."""
        return self.pass1 if self.pass1 is not None else self.avg_k

    @property
    def score_name(self) -> str:
        """``"pass@1"`` or ``"avg@k"``, naming :attr:`score`."""
        return "pass@1" if self.pass1 is not None else f"avg@{self.k}"

    def to_dict(self) -> dict:
        """The metrics (without samples and per-problem scores) as a dict: ``pass@1`` only
        with a greedy pass, ``avg@k``/``pass@k`` only when ``k > 0``."""
        out = {"pass@1": self.pass1} if self.pass1 is not None else {}
        if self.k > 0:
            out.update({f"avg@{self.k}": self.avg_k, f"pass@{self.k}": self.pass_k})
        out.update(n=self.n, mean_len=self.mean_len, boxed_rate=self.boxed_rate,
                   generated_tokens=self.generated_tokens)  # fmt: skip
        return {**out, "checker": self.checker} if self.checker else out


def evaluate_problems(
    generate: Callable[[list[list[int]], dict], list[list[int]]],
    decode: Callable[[list[int]], str], prompts: Sequence[list[int]], answers: Sequence[str],
    *, k: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    max_new_tokens: int = 256, greedy: bool = True, batch_size: int = 64,
    n_samples_kept: int = 4, check: Callable[[str, str], bool] = is_correct,
) -> EvalResult:  # fmt: skip
    """Score prompts against reference answers.

    ``generate(prompt_ids, sampling)`` returns one completion per prompt, where ``sampling``
    is a dict with ``do_sample``, ``max_new_tokens`` and, when sampling, ``temperature``,
    ``top_p`` and ``top_k`` (:func:`hf_generate` makes one from a model).
    ``greedy`` adds a greedy pass (pass@1); ``k > 0`` samples ``k`` completions per prompt
    (avg@k and pass@k). ``check(completion_text, answer)`` scores a completion (default:
    its last ``\\boxed{}`` through :func:`answers_match`). The reference protocol is
    ``evaluate_problems(..., **EVAL_PRESETS["paper"].as_kwargs())``.

    >>> gen = lambda batch, sampling: [[7] for _ in batch]
    >>> res = evaluate_problems(gen, lambda ids: r"\\boxed{7}", [[1], [2]], ["7", "8"], k=3)
    >>> res.pass1, res.avg_k, res.pass_k, res.generated_tokens
    (0.5, 0.5, 0.5, 8)
    """
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers differ in length ({len(prompts)} vs {len(answers)})")
    if not prompts:
        raise ValueError("nothing to evaluate: the evaluation set is empty")
    _check_sampling(temperature, top_p, top_k, max_new_tokens, k, greedy)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def run(sampling: dict, reps: int) -> list[list[int]]:
        outs: list[list[int]] = []
        expanded = [p for p in prompts for _ in range(reps)]
        for i in range(0, len(expanded), batch_size):
            outs.extend(generate(expanded[i : i + batch_size], sampling))
        if len(outs) != len(expanded):
            raise ValueError(
                f"generate returned {len(outs)} completions for {len(expanded)} prompts"
            )
        return outs

    def score(comps: list[list[int]], reps: int) -> tuple[list[str], list[bool]]:
        texts = [decode(c) for c in comps]
        return texts, [check(t, answers[i // reps]) for i, t in enumerate(texts)]

    n = len(prompts)
    pass1 = avg_k = pass_k = None
    generated = 0
    shown = None  # (completions, texts, correct, reps) that mean_len/boxed_rate/samples use
    per_problem: list[float] = []
    if greedy:
        comps = run({"do_sample": False, "max_new_tokens": max_new_tokens}, 1)
        texts, correct = score(comps, 1)
        pass1 = sum(correct) / n
        per_problem = [float(c) for c in correct]
        generated += sum(len(c) for c in comps)
        shown = (comps, texts, correct, 1)
    if k > 0:
        sampling = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
        }
        comps = run(sampling, k)
        texts, hits = score(comps, k)
        by_problem = [hits[i * k : (i + 1) * k] for i in range(n)]
        avg_k = sum(hits) / len(hits)
        pass_k = sum(any(h) for h in by_problem) / n
        generated += sum(len(c) for c in comps)
        if shown is None:
            per_problem = [sum(h) / k for h in by_problem]
            shown = (comps, texts, hits, k)
    comps, texts, correct, reps = shown
    samples = [
        {"completion": t, "answer": answers[i // reps], "correct": c}
        for i, (t, c) in enumerate(zip(texts, correct, strict=True))
    ][:n_samples_kept]
    return EvalResult(
        pass1=pass1,
        avg_k=avg_k,
        k=k,
        n=n,
        mean_len=sum(len(c) for c in comps) / len(comps),
        boxed_rate=sum(extract_boxed(t) is not None for t in texts) / len(texts),
        samples=samples,
        pass_k=pass_k,
        generated_tokens=generated,
        per_problem=per_problem,
        checker=answer_checker() if check is is_correct else "custom",
    )


def hf_generate(model, tokenizer) -> Callable[[list[list[int]], dict], list[list[int]]]:
    """A ``generate(prompt_ids, sampling)`` for :func:`evaluate_problems` over
    ``model.generate`` (left padding, KV cache, stop at EOS; the EOS is kept, padding is
    dropped). The model is in eval mode while sampling and restored afterwards."""
    import torch

    pad = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)

    @torch.no_grad()
    def generate(prompts: list[list[int]], sampling: dict) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        kw = dict(sampling)
        if not kw.get("do_sample"):
            kw.update(temperature=None, top_p=None, top_k=None)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
                **kw,
            )
        finally:
            model.train(was_training)
        rows = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            row = row[:cut]
            while row and row[-1] == pad and pad not in eos:
                row.pop()
            rows.append(row)
        return rows

    return generate
