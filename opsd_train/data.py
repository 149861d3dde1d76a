"""Problems for OPSD: the record type, loaders (JSONL, Hugging Face ``datasets``) and the
built-in generator of synthetic multi-step arithmetic word problems (the embedded default).

Every problem carries the privileged information the teacher sees: a worked ``solution``
ending in ``\\boxed{answer}``.

>>> train, held_out = synthetic_split(n_train=8, n_eval=4, seed=0)
>>> len(train), len(held_out)
(8, 4)
>>> p = train[0]
>>> p.solution.endswith("\\\\boxed{" + p.answer + "}.")
True
>>> {q.question for q in train}.isdisjoint({q.question for q in held_out})
True
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "extract_boxed",
    "Problem",
    "load_jsonl",
    "save_jsonl",
    "load_hf_dataset",
    "problems_from_records",
    "split_held_out",
    "synthetic_problem",
    "synthetic_problems",
    "synthetic_split",
]


@dataclass(frozen=True)
class Problem:
    """One training/evaluation item.

    ``question`` is what the student sees; ``solution`` is the verified worked solution the
    teacher additionally sees; ``answer`` is the final answer used by the checker.
    """

    question: str
    solution: str
    answer: str

    def to_dict(self) -> dict:
        """Return the problem as a plain ``dict`` (JSON-serialisable)."""
        return asdict(self)


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


_QUESTION_KEYS = ("question", "problem", "prompt")


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def problems_from_records(
    records: Iterable[dict],
    *,
    question_key: str | None = "question",
    solution_key: str = "solution",
    answer_key: str = "answer",
    source: str = "dataset",
    need_solution: bool = True,
) -> list[Problem]:
    """Turn mapping rows into :class:`Problem` records.

    ``question_key=None`` takes the first of ``question``, ``problem``, ``prompt`` present.
    A missing answer is taken from the last ``\\boxed{}`` of the solution. With
    ``need_solution=False`` (evaluation data) a row needs only a question and an answer.
    A bad row raises ``ValueError`` naming the row and the column; so does an empty input.

    >>> problems_from_records([{"question": "1+1?", "solution": "1+1=2. \\\\boxed{2}"}])[0].answer
    '2'
    >>> problems_from_records([{"question": "1+1?"}])
    Traceback (most recent call last):
    ...
    ValueError: dataset row 0: missing or empty field 'solution' (columns present: ['question'])
    """
    out: list[Problem] = []
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise ValueError(f"{source} row {i}: expected a mapping, got {type(row).__name__}")
        keys = (question_key,) if question_key is not None else _QUESTION_KEYS
        qkey = next((k for k in keys if not _blank(row.get(k))), None)
        if qkey is None:
            want = repr(question_key) if question_key else f"one of {_QUESTION_KEYS}"
            raise ValueError(f"{source} row {i}: missing or empty question field {want} "
                             f"(columns present: {sorted(row)})")  # fmt: skip
        solution = "" if _blank(row.get(solution_key)) else str(row[solution_key])
        if need_solution and not solution:
            raise ValueError(f"{source} row {i}: missing or empty field {solution_key!r} "
                             f"(columns present: {sorted(row)})")  # fmt: skip
        answer = row.get(answer_key)
        if _blank(answer):
            answer = extract_boxed(solution)
            if _blank(answer):
                raise ValueError(
                    f"{source} row {i}: no {answer_key!r} field and no solution with a "
                    f"\\boxed{{}} answer (columns present: {sorted(row)})"
                )
        out.append(Problem(str(row[qkey]), solution, str(answer).strip()))
    if not out:
        raise ValueError(f"{source} is empty: no problems to train or evaluate on")
    return out


def load_jsonl(path: str | Path, **keys) -> list[Problem]:
    """Load problems from a JSON-lines file (one object per line; blank lines skipped);
    ``keys`` as in :func:`problems_from_records`. Raises ``FileNotFoundError``, or
    ``ValueError`` naming the line for malformed JSON or non-UTF-8 bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return problems_from_records(rows, source=str(path), **keys)


def split_held_out(
    problems: Sequence[Problem], fraction: float
) -> tuple[list[Problem], list[Problem], int]:
    """Hold out the first ``int(len(problems) * fraction)`` problems for evaluation.

    Returns ``(train, held_out, removed)``: training problems whose question also occurs in
    the held-out set are removed (``removed`` counts them), so duplicated questions in the
    data never make the held-out set overlap the training set.

    >>> ps = [Problem(q, "s", "1") for q in ("a", "b", "a", "c")]
    >>> train, held, removed = split_held_out(ps, 0.25)
    >>> [p.question for p in train], [p.question for p in held], removed
    (['b', 'c'], ['a'], 1)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction!r}")
    n_eval = int(len(problems) * fraction)
    held = list(problems[:n_eval])
    seen = {p.question for p in held}
    train = [p for p in problems[n_eval:] if p.question not in seen]
    return train, held, len(problems) - n_eval - len(train)


def save_jsonl(problems: Sequence[Problem], path: str | Path) -> None:
    """Write problems as JSON lines (the format :func:`load_jsonl` reads)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict()) + "\n")


def load_hf_dataset(name_or_path: str, *, split: str = "train", config_name: str | None = None,
                    limit: int | None = None, **keys) -> list[Problem]:  # fmt: skip
    """Problems from a Hugging Face dataset (``datasets``, which TRL installs); ``keys`` as
    in :func:`problems_from_records` (question column: the first of ``question``,
    ``problem``, ``prompt`` unless ``question_key`` names it)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_hf_dataset needs the 'datasets' package: pip install datasets "
                          "(or convert your data to JSONL and use load_jsonl)") from e  # fmt: skip
    ds = datasets.load_dataset(name_or_path, config_name, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = (dict(r) for r in ds)
    return problems_from_records(rows, **{"question_key": None, **keys}, source=name_or_path)


# ---------------------------------------------------------------------------------------
# Synthetic multi-step arithmetic word problems (the embedded default)
# ---------------------------------------------------------------------------------------

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "marbles"]


def _fmt_eq(a: int, op: str, b: int, r: int) -> str:
    return f"{a} {op} {b} = {r}"


def synthetic_problem(rng: random.Random) -> Problem:
    """Draw one synthetic problem (2 or 3 arithmetic steps) from ``rng``.

    The worked solution states each intermediate result as an equation and ends with
    ``The answer is \\boxed{N}.``; all intermediate values are non-negative integers.
    """
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:  # a + b - c
        a, b = rng.randint(2, 19), rng.randint(2, 9)
        s = a + b
        c = rng.randint(1, min(9, s - 1))
        r = s - c
        q = (
            f"{name} has {a} {item}. {name} gets {b} more {item}, then gives away {c}. "
            f"How many {item} does {name} have now?"
        )
        steps = [_fmt_eq(a, "+", b, s), _fmt_eq(s, "-", c, r)]
    elif kind == 1:  # a * b - c
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        p = a * b
        c = rng.randint(1, min(9, p - 1))
        r = p - c
        q = (
            f"{name} buys {a} bags with {b} {item} in each bag and loses {c} {item}. "
            f"How many {item} does {name} have?"
        )
        steps = [_fmt_eq(a, "*", b, p), _fmt_eq(p, "-", c, r)]
    elif kind == 2:  # a * b + c
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        p = a * b
        c = rng.randint(1, 9)
        r = p + c
        q = (
            f"{name} has {a} boxes of {b} {item} and {c} loose {item}. "
            f"How many {item} does {name} have in total?"
        )
        steps = [_fmt_eq(a, "*", b, p), _fmt_eq(p, "+", c, r)]
    else:  # (a + b) * c - d
        a, b, c = rng.randint(1, 5), rng.randint(1, 4), rng.randint(2, 5)
        s = a + b
        p = s * c
        d = rng.randint(1, min(9, p - 1))
        r = p - d
        q = (
            f"{name} has {a} red and {b} blue {item} in each of {c} bags, "
            f"then uses {d} {item}. How many {item} are left?"
        )
        steps = [_fmt_eq(a, "+", b, s), _fmt_eq(s, "*", c, p), _fmt_eq(p, "-", d, r)]
    solution = ". ".join(steps) + f". The answer is \\boxed{{{r}}}."
    return Problem(q, solution, str(r))


def synthetic_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` synthetic problems drawn with ``random.Random(seed)`` (duplicates possible)."""
    rng = random.Random(seed)
    return [synthetic_problem(rng) for _ in range(n)]


def synthetic_split(
    n_train: int = 4000, n_eval: int = 200, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """A seeded train/held-out split of distinct synthetic problems.

    Held-out questions never occur in the training set (questions are deduplicated before
    splitting), so held-out accuracy measures generalisation, not recall.
    """
    if n_train < 1 or n_eval < 0:
        raise ValueError("n_train must be >= 1 and n_eval >= 0")
    rng = random.Random(seed)
    seen: dict[str, Problem] = {}
    attempts = 0
    while len(seen) < n_train + n_eval:
        p = synthetic_problem(rng)
        seen.setdefault(p.question, p)
        attempts += 1
        if attempts > 50 * (n_train + n_eval) + 1000:
            raise ValueError(f"cannot draw {n_train + n_eval} distinct synthetic problems")
    items = list(seen.values())
    return items[n_eval:], items[:n_eval]
