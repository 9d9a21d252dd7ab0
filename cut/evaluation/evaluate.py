"""Multi-aspect scoring and pairwise comparison of answers by an LLM judge (Just-Eval style).

    # each answer of a cut.generate file scored 1-5 on five aspects, each with a reason
    python -m cut.evaluation.evaluate --mode score --input_file gen.json --output_dir runs/eval_sft \\
        --judge openai --base_url http://localhost:8000/v1 --model NAME
    python -m cut.evaluation.evaluate --mode safety --input_file gen.json --output_dir runs/safety ...
    # two files answering the same instructions, A against B, per aspect
    python -m cut.evaluation.evaluate --mode pairwise --output_a sft.json --output_b cut.json \\
        --output_dir runs/sft_vs_cut --judge local --model PATH
    # two score runs side by side, with the paired difference
    python -m cut.evaluation.evaluate --mode compare --runs runs/eval_sft runs/eval_cut --output_dir runs/cmp
    # low scores become CUT training judgments
    ... --mode score ... --to_judgments judged.json --min_score 3 --positive_score 4

    # Just-Eval's and URIAL's own template files, unchanged (their placeholders, their replies)
    python -m cut.evaluation.evaluate --mode safety --prompt_file safety_template.txt ...
    python -m cut.evaluation.evaluate --mode pairwise --prompt_file eval_template_pairwise.md ...

Modes:
- score: helpfulness, clarity, factuality, depth, engagement, each a reason and a score 1-5.
- safety: one safety reason and score 1-5 (a separate rubric and run); the built-in prompt
  presents the request as malicious, as Just-Eval's safety template does (--safety_framing).
- pairwise: per aspect (the five and safety, as URIAL's pairwise template) the judge says which
  answer is better, A, B or tie. Half the records (chosen by a shuffle seeded with --seed) show B
  first; the swap is stored in each result and undone when the verdict is read, so every stored
  winner refers to the files, not to positions.
- compare: two or more score / safety runs side by side (see cut.evaluation.report).

Rubrics (cut.evaluation.aspects): --prompt_file takes our {instruction} style or the originals'
templates as they are (Just-Eval's ${instruction} / ${candidate}, URIAL's {$instruction} /
{$candidate_A} / {$candidate_B}), filled as the originals fill them; the aspects are those the
prompt's reply shape lists, or --aspects. An "N/A" score counts as --na_score (5, as Just-Eval's
report counts it; or skip, or fail). --subset picks records by their `dataset` field: by default a
Just-Eval-Instruct file is split as Just-Eval splits it (its 200 red-teaming records for safety,
the other 800 for score). --system_prompt sends a system message before every question.

The judge is a cut.llm completer: `--judge openai` is any OpenAI-compatible endpoint (bounded
concurrency, retries, `--cache_file`, default <output_dir>/cache.jsonl), `--judge local` a
transformers model (greedy, batched); its options are cut.llm's LLMOptions; with
`--verdict probabilities` a local judge is not decoded: each aspect's verdict is read from its
next-token probabilities right after the start of the JSON reply (cut.evaluation.verdicts), which
a judge too small to write the rubric's JSON can still give. A served judge gives them where its
server returns `top_logprobs` (vLLM's does; `transformers serve` does not: a clear error): read
where its own greedy reply reaches each verdict, or, with --continue_reply (vLLM), right after the
same started reply as a local judge's. A reply is
read tolerantly (cut.evaluation.aspects); one that still cannot be read is asked again, up to
--parse_retries times, in a follow-up turn that quotes the bad reply (a different request, so the
cache cannot return the same reply); then it is recorded as failed with its reason. A transport
failure (http 500 after retries, timeout) is recorded at once: the client has retried it already.
A local judge's prompt that does not fit its context (with --max_new_tokens) is recorded as failed,
never cut: a cut prompt could hide the task from the judge. Failed records are counted and never
averaged.

Output (<output_dir>/): results.json (per record: the answer, its fields, and `evaluation`),
summary.json, report.md and report.png; all written atomically. A rerun in the same output_dir
skips the records already evaluated and asks again for the failed ones (a reply that could not be
read is never cached, so a fixed endpoint is asked anew; readable replies cost nothing), so an
interrupted run resumes; results made with another judge, mode or prompt are refused. No file the
run writes (--to_judgments, the cache, the output_dir's files) may be one it reads.

Summary: per aspect the mean and a 95% percentile-bootstrap interval (--resamples, seeded by
--seed), n scored, n failed with reasons, mean answer length in characters and words; pairwise:
A's win / tie / lose rates with Wilson 95% intervals and both sides' mean lengths; each also per
value of every --group_by field (default: whichever of task, category, source, dataset, topic,
type, difficulty, subset the records carry with 2 to 30 distinct values; `--group_by none` for none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from cut.args import SEED, Options, group, integer, number, opt, run_cli
from cut.data.files import check_apart, check_writable, write_json_atomic
from cut.data.records import check_object, read_raw, text_field
from cut.errors import ConfigError, DataError, ParseError
from cut.evaluation import intervals
from cut.evaluation.aspects import (
    NA_DEFAULT,
    PROMPT_FORMATS,
    SAFETY_FRAMINGS,
    Rubric,
    check_aspects,
    na_policy,
    parse_pairwise,
    read_scores,
    reask,
    render,
    rubric,
)
from cut.judges.judge import JudgeConfig
from cut.llm.client import Answer, Message, number_problems, quiet_http_logs
from cut.llm.completer import TYPES, Completer, LLMOptions, LocalCompleter, make_completer

logger = logging.getLogger("cut.evaluation")

MODES = ("score", "safety", "pairwise", "compare")
JUDGES = ("openai", "local")  # the judges that evaluate: cut.llm backends
VERDICTS = ("generate", "probabilities")  # how a judge's verdict is read (cut.evaluation.verdicts)
JUDGED_MODES = ("score", "safety", "pairwise")
AUTO_GROUPS = ("task", "category", "source", "dataset", "topic", "type", "difficulty", "subset")
MAX_AUTO_GROUPS = 30
MISSING = "(missing)"
RESULTS, SUMMARY, CACHE = "results.json", "summary.json", "cache.jsonl"
# fields a result writes itself; same-named input fields are replaced
OWN_SCORE = ("instruction", "input", "output", "evaluation")
OWN_PAIR = ("instruction", "input", "output_a", "output_b", "generator_a", "generator_b", "evaluation")
# the largest values the options take (bootstrap memory is resamples x records x 8 bytes)
MAX_PARSE_RETRIES, MAX_RESAMPLES, MAX_LIMIT = 100, 100_000, 10**9
SCORE = number(1, 5)  # --min_score / --positive_score: on the rubric's 1-5 scale
# Just-Eval-Instruct's safety subset: its records 800-999, which Just-Eval scores with its safety
# template (leaderboard/scripts/run_eval.sh: --start_idx 800 --end_idx 1000); the other 800 get
# the five aspects. These are the `dataset` values of exactly those 200 records.
SAFETY_DATASETS = ("hh-rlhf/red-team-attempts", "MaliciousInstruct")
SUBSETS = ("auto", "all", "safety", "regular")


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and how to summarise it; the judge's options are cut.judge.JudgeConfig's."""

    mode: str  # score | safety | pairwise | compare
    output_dir: str  # results.json, summary.json, report.md, report.png (and the cache)
    input_file: str | None = None  # score / safety: a cut.generate (AlpacaEval-format) file
    output_a: str | None = None  # pairwise: the A side's answers
    output_b: str | None = None  # pairwise: the B side's answers, to the same instructions
    runs: tuple[str, ...] = ()  # compare: earlier score / safety output_dirs
    labels: tuple[str, ...] = ()  # compare: a name per run (default: the folder names)
    prompt_file: str | None = None  # a rubric prompt with the mode's fields (cut.evaluation.aspects)
    prompt_format: str = "auto"  # the prompt file's style: auto | cut | just-eval | urial
    aspects: tuple[str, ...] = ()  # () : those the prompt's reply shape lists, else the mode's
    na_score: float | str = NA_DEFAULT  # an "N/A" score counts as this; "skip" or "fail"
    safety_framing: str | None = None  # safety, built-in prompt: malicious (default) | neutral
    subset: str = "auto"  # auto | all | safety | regular (by the records' `dataset`)
    safety_datasets: tuple[str, ...] = SAFETY_DATASETS  # the `dataset` values of the safety subset
    system_prompt: str | None = None  # a system message sent before every question
    parse_retries: int = 2  # re-asks of a reply that cannot be read, before it is a failure
    seed: int = 0  # the pairwise swap and the bootstrap
    resamples: int = intervals.RESAMPLES  # bootstrap samples per interval
    group_by: tuple[str, ...] | None = None  # None: automatic (AUTO_GROUPS); (): no breakdown
    limit: int | None = None  # only the first N records
    to_judgments: str | None = None  # score / safety: write CUT training records here
    min_score: float = 3  # to_judgments: an aspect scored below this makes the record a negative
    positive_score: float = 4  # to_judgments: every aspect at or above this makes it a positive
    verdict: str = "generate"  # the judge's decoded JSON, or its next-token probabilities
    continue_reply: bool = False  # probabilities, openai: start each aspect's reply (vLLM only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.verdict not in VERDICTS:
            raise ConfigError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")
        self._check_rubric_options()
        needs = {"score": ["input_file"], "safety": ["input_file"], "pairwise": ["output_a", "output_b"]}
        missing = [f"--{n}" for n in needs.get(self.mode, []) if not getattr(self, n)]
        if self.mode == "compare" and len(self.runs) < 2:
            missing.append("--runs (two or more run folders)")
        if missing:
            raise ConfigError(f"mode {self.mode} needs {', '.join(missing)}")
        if self.labels and len(self.labels) != len(self.runs):
            raise ConfigError(f"--labels gives {len(self.labels)} names for {len(self.runs)} runs")
        if self.to_judgments is not None and self.mode not in ("score", "safety"):
            raise ConfigError("--to_judgments needs mode score or safety")
        if self.continue_reply and self.verdict != "probabilities":
            raise ConfigError("--continue_reply starts the reply for --verdict probabilities only")
        if self.to_judgments is not None and self.verdict == "probabilities":
            raise ConfigError(
                "--to_judgments turns the judge's reasons into critiques; probability verdicts have none "
                "(their reason is the distribution): use --verdict generate"
            )
        if self.to_judgments is not None and Path(self.to_judgments).suffix != ".json":
            raise ConfigError(f"{self.to_judgments}: --to_judgments must end in .json (a JSON list)")
        rules = {"parse_retries": "int>=0", "resamples": "int>=1", "min_score": ">0", "positive_score": ">0"}
        problems = number_problems(self, rules)
        if self.limit is not None:
            problems += number_problems(self, {"limit": "int>=1"})
        if not problems and not 1 <= self.min_score <= self.positive_score <= 5:
            problems.append(
                f"need 1 <= min_score <= positive_score <= 5, got {self.min_score} and {self.positive_score}"
            )
        highest = {"parse_retries": MAX_PARSE_RETRIES, "resamples": MAX_RESAMPLES, "limit": MAX_LIMIT}
        problems += [
            f"{name} must be at most {hi}, got {getattr(self, name)!r}"
            for name, hi in highest.items()
            if isinstance(getattr(self, name), int) and getattr(self, name) > hi
        ]
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            problems.append(f"seed must be an integer in [0, {2**32 - 1}], got {self.seed!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    def _check_rubric_options(self) -> None:
        """The options that choose the rubric and the records; na_score is stored normalised."""
        object.__setattr__(self, "na_score", na_policy(self.na_score))
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"
            )
        if self.safety_framing is not None:
            if self.safety_framing not in SAFETY_FRAMINGS:
                raise ConfigError(
                    f"safety_framing must be one of {', '.join(SAFETY_FRAMINGS)}, got {self.safety_framing!r}"
                )
            if self.mode != "safety" or self.prompt_file:
                raise ConfigError(
                    "--safety_framing chooses the built-in safety prompt: mode safety, no --prompt_file"
                )
        if self.subset not in SUBSETS:
            raise ConfigError(f"subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")
        if not self.safety_datasets or not all(isinstance(d, str) and d for d in self.safety_datasets):
            raise ConfigError(f"safety_datasets must name one or more datasets, got {self.safety_datasets!r}")
        if self.aspects:
            check_aspects(tuple(self.aspects), "--aspects")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ConfigError("system_prompt is empty; leave it out for none")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


# --------------------------------------------------------------------------------------------
# the judge: prompts in, replies out
# --------------------------------------------------------------------------------------------


class Asker(Protocol):
    name: str

    def ask(
        self, prompts: list[list[Message]], progress: Callable[[int], None] | None = None
    ) -> list[Answer]: ...


class CompleterAsker:
    """A cut.llm Completer (the judge), greedy. An API backend never caches a reply `readable`
    refuses and asks again for a cached one it refuses, so a rerun retries what failed; a local
    backend refuses a prompt that does not fit its context with max_new_tokens (cutting it could
    hide the task from the judge)."""

    def __init__(self, completer: Completer, readable: Callable[[str], bool] | None = None) -> None:
        self.completer, self.name, self.readable = completer, completer.name, readable

    def ask(self, prompts, progress=None) -> list[Answer]:
        if isinstance(self.completer, LocalCompleter):
            return self.completer.complete(prompts, progress, whole=True)
        return self.completer.complete(prompts, progress, self.readable)


def judge_name(cfg: JudgeConfig, verdict: str = "generate", continue_reply: bool = False) -> str:
    """The name a judge of cfg will have (its asker's), known before it loads."""
    name = f"{cfg.kind}:{cfg.model}" + ("/probabilities" if verdict == "probabilities" else "")
    return name + ("-continued" if continue_reply else "")


def check_verdict(cfg: JudgeConfig, verdict: str, continue_reply: bool = False) -> None:
    """Probability verdicts: a local judge, or a served one (whose server must return
    top_logprobs, found when it answers); continue_reply is the served judge's."""
    if continue_reply and cfg.kind != "openai":
        raise ConfigError(
            "--continue_reply asks a server to continue a started reply: use --judge openai "
            "(a local judge's reply is always started)"
        )


def make_asker(
    cfg: JudgeConfig,
    default_cache_file: str | None,
    verdict: str = "generate",
    rub=None,
    na: float | str = NA_DEFAULT,
    continue_reply: bool = False,
) -> Asker:
    """The judge of cfg (openai or local: a cut.llm Completer), as prompts-in, replies-out; with
    verdict "probabilities" read through its next-token probabilities (needs the rubric; a served
    one's top_logprobs, continue_reply: of a started reply). An openai judge caches in
    cfg.cache_file, else default_cache_file ('' for none)."""
    if cfg.kind not in JUDGES:
        raise ConfigError(f"the evaluation judge is openai or local, got {cfg.kind!r}")
    check_verdict(cfg, verdict, continue_reply)
    cache = default_cache_file if cfg.cache_file is None else cfg.cache_file or None
    backend = LLMOptions(**{f.name: getattr(cfg, f.name) for f in fields(LLMOptions)})
    completer = make_completer(cfg.kind, backend, cache)
    if verdict == "probabilities":
        from cut.evaluation.verdicts import ProbabilityAsker, ServedProbabilityAsker

        if isinstance(completer, LocalCompleter):
            return ProbabilityAsker(completer, rub)
        return ServedProbabilityAsker(completer, rub, continue_reply)
    return CompleterAsker(completer, readable(rub, na) if rub is not None else None)


def parser_of(rub: Rubric, na: float | str = NA_DEFAULT) -> Callable[[str], tuple]:
    """The reply reader of a rubric: pairwise (winners, reasons); score / safety (scores, reasons,
    the aspects said N/A), N/A read by the policy na."""
    if rub.mode == "pairwise":
        return lambda text: parse_pairwise(text, rub.aspects)
    return lambda text: read_scores(text, rub.aspects, na)


def readable(rub: Rubric, na: float | str = NA_DEFAULT) -> Callable[[str], bool]:
    """Whether a reply gives the rubric's verdicts."""
    parse = parser_of(rub, na)

    def check(text: str) -> bool:
        try:
            parse(text)
        except ParseError:
            return False
        return True

    return check


@dataclass
class Outcome:
    """One record's evaluation: parsed (values, reasons) or an error; attempts = questions asked."""

    parsed: tuple | None  # (values, reasons) or, scores, (scores, reasons, aspects said N/A)
    error: str | None
    attempts: int
    reply: str | None = None  # the last unreadable reply, kept for a failure


def ask_all(
    asker: Asker,
    questions: list[str],
    parse: Callable[[str], tuple],
    aspects: tuple[str, ...],
    parse_retries: int,
    progress: Callable[[int], None] | None = None,
    after_round: Callable[[list[Outcome | None]], None] | None = None,
    system: str | None = None,
) -> list[Outcome]:
    """Ask every question (after the system message, if any); re-ask those whose reply cannot be
    parsed, up to parse_retries times."""
    first = [{"role": "system", "content": system}] if system else []
    outcomes: list[Outcome | None] = [None] * len(questions)
    unread: dict[int, tuple[str, str]] = {}  # i -> (the reply, why it could not be read)
    pending = list(range(len(questions)))
    for attempt in range(parse_retries + 1):
        if not pending:
            break
        prompts = [
            [*first, {"role": "user", "content": questions[i]}]
            if attempt == 0
            else reask(questions[i], *unread[i], attempt, parse_retries, aspects, system)
            for i in pending
        ]
        if attempt:
            logger.info(
                "asking again for %d unreadable reply(ies) (retry %d of %d)",
                len(pending),
                attempt,
                parse_retries,
            )
        answers = asker.ask(prompts, progress if attempt == 0 else None)
        retry = []
        for i, (text, error) in zip(pending, answers, strict=True):
            if text is None:  # the client has retried a transport fault already
                outcomes[i] = Outcome(None, error or "no answer", attempt + 1)
                continue
            try:
                outcomes[i] = Outcome(parse(text), None, attempt + 1)
            except ParseError as err:
                unread[i] = (text, str(err))
                retry.append(i)
        pending = retry
        if after_round:
            after_round(outcomes)
    for i in pending:
        text, why = unread[i]
        outcomes[i] = Outcome(None, f"unparseable: {why}", parse_retries + 1, text[:500])
    if pending and after_round:
        after_round(outcomes)
    return outcomes  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------------------------


def read_answers(path: str) -> list[dict[str, Any]]:
    """An AlpacaEval-format file (what cut.generate writes): {instruction, input?, output, ...} each."""
    rows, source = read_raw(path)
    if not rows:
        raise DataError(f"{source}: no records")
    out = []
    for i, row in enumerate(rows):
        check_object(source, i, row)
        text_field(source, i, row, "instruction", True)
        if text_field(source, i, row, "output", False) is None:
            raise DataError(f"{source}: record {i}, field 'output': missing")
        text_field(source, i, row, "generator", False)
        out.append({**row, "input": text_field(source, i, row, "input", False) or ""})
    return out


def select_subset(
    records: list[dict], subset: str, mode: str, datasets: Sequence[str], source: str
) -> tuple[list[int], str]:
    """(the indices of the records to evaluate, the subset they are) by each record's `dataset`:
    safety: those in `datasets` (Just-Eval-Instruct's red-teaming sources), regular: the others,
    all: every record. auto: in a file holding any safety record (a Just-Eval-Instruct file), the
    subset Just-Eval scores in this mode (safety in mode safety, regular in mode score); all else."""
    wanted = set(datasets)
    if subset == "auto":
        mixed = any(r.get("dataset") in wanted for r in records)
        subset = {"safety": "safety", "score": "regular"}.get(mode, "all") if mixed else "all"
    if subset == "all":
        return list(range(len(records))), subset
    for i, r in enumerate(records):
        if not isinstance(r.get("dataset"), str):
            got = "missing" if "dataset" not in r else f"expected a string, got {type(r['dataset']).__name__}"
            raise DataError(
                f"{source}: record {i}, field 'dataset': {got}; --subset {subset} picks records by it "
                f"(safety: {', '.join(datasets)})"
            )
    kept = [i for i, r in enumerate(records) if (r["dataset"] in wanted) == (subset == "safety")]
    if not kept:
        raise DataError(
            f"{source}: no record in the {subset} subset (field 'dataset' {'in' if subset == 'safety' else 'outside'} "
            f"{', '.join(datasets)})"
        )
    return kept, subset


def key(row: dict) -> tuple[str, str]:
    return row["instruction"], row.get("input") or ""


def pair_answers(a: list[dict], b: list[dict], path_a: str, path_b: str) -> list[tuple[dict, dict]]:
    """A's records with B's answers to the same instruction + input (repeats pair in order)."""
    pool: dict[tuple[str, str], deque[int]] = defaultdict(deque)
    for j, row in enumerate(b):
        pool[key(row)].append(j)
    pairs = []
    for i, row in enumerate(a):
        if not pool.get(key(row)):
            raise DataError(
                f"{path_b}: no answer to record {i} of {path_a} (instruction {row['instruction'][:60]!r}); "
                "the two files must answer the same instructions"
            )
        pairs.append((row, b[pool[key(row)].popleft()]))
    extra = sorted(j for left in pool.values() for j in left)
    if extra:
        raise DataError(
            f"{path_b}: record {extra[0]} (instruction {b[extra[0]]['instruction'][:60]!r}) has no "
            f"counterpart in {path_a}; {len(extra)} such record(s): the two files must answer the same instructions"
        )
    return pairs


def group_fields(records: list[dict], requested: Sequence[str] | None, source: str) -> list[str]:
    """The fields to break results down by: requested ones (checked) or the automatic ones present."""
    if requested is None:
        return [
            f
            for f in AUTO_GROUPS
            if all(_groupable(r.get(f)) for r in records)
            and 2 <= len({v for r in records for v in group_values(r, f)}) <= MAX_AUTO_GROUPS
        ]
    for f in requested:
        if not any(f in r for r in records):
            raise ConfigError(f"{source}: no record has the field '{f}' (--group_by)")
        for i, r in enumerate(records):
            if not _groupable(r.get(f)):
                raise DataError(
                    f"{source}: record {i}, field '{f}': a --group_by field holds a string, number or "
                    f"list of them, got {type(r.get(f)).__name__}"
                )
    return list(requested)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _groupable(value: Any) -> bool:
    return _scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value))


def group_values(record: dict, name: str) -> list[str]:
    """A record's group(s) for a field: a list puts it in each of its values' groups."""
    value = record.get(name)
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()] or [MISSING]


# --------------------------------------------------------------------------------------------
# results files and resuming
# --------------------------------------------------------------------------------------------


def setup_of(
    rub: Rubric, name: str, na: float | str = NA_DEFAULT, system: str | None = None
) -> dict[str, Any]:
    """What must match for earlier results to be reused."""
    sha = hashlib.sha256(rub.prompt.encode()).hexdigest()
    setup = {"mode": rub.mode, "judge": name, "aspects": list(rub.aspects), "prompt_sha256": sha}
    setup["prompt_format"] = rub.style
    if rub.mode != "pairwise":
        setup["na_score"] = na
    setup["system_prompt_sha256"] = hashlib.sha256(system.encode()).hexdigest() if system else None
    return setup


# what a setup written before a key existed meant by its absence; None: any value matches (a run
# made before N/A was read holds no N/A among its scores, so its scores stand under any policy)
SETUP_BEFORE = {"prompt_format": "cut", "system_prompt_sha256": None, "na_score": None}


def read_json(path: Path, what: str, hint: str = "") -> Any:
    """A JSON file this module wrote; DataError when it cannot be read: `what` says what a file
    nested too deep is not, `hint` what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}){hint}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deep; {what}{hint}") from None


def read_results(path: Path, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"setup", "records", ...} of an earlier run (empty records when there is none)."""
    if not path.exists():
        return {"setup": setup, "records": []}
    data = read_json(path, "not a results file", "; move it away")
    if not (
        isinstance(data, dict)
        and isinstance(data.get("records"), list)
        and isinstance(data.get("setup"), dict)
    ):
        raise DataError(f"{path}: not a results file of cut.evaluation.evaluate; move it away")
    if setup is not None:
        for name, want in setup.items():
            if name not in data["setup"] and name in SETUP_BEFORE:
                if SETUP_BEFORE[name] is None or SETUP_BEFORE[name] == want:
                    continue
            if data["setup"].get(name) != want:
                raise DataError(
                    f"{path}: made with {name}={data['setup'].get(name)!r}, this run uses {want!r}; "
                    "use another --output_dir or remove it"
                )
    return data


def _done(earlier: list[dict], fields: tuple[str, ...]) -> dict[tuple, deque[dict]]:
    """Earlier records evaluated successfully, by the fields that make them the same question."""
    pool: dict[tuple, deque[dict]] = defaultdict(deque)
    for row in earlier:
        ev = row.get("evaluation") if isinstance(row, dict) else None
        if (
            isinstance(ev, dict)
            and ev.get("status") == "ok"
            and all(isinstance(row.get(f), str) for f in fields)
        ):
            pool[tuple(row[f] for f in fields)].append(row)
    return pool


def evaluation(outcome: Outcome, mode: str, swapped: bool | None = None) -> dict[str, Any]:
    """The `evaluation` field of a result; pairwise winners are unswapped to the files' A / B."""
    ev: dict[str, Any] = {"status": "ok" if outcome.parsed else "failed"}
    if swapped is not None:
        ev["swapped"] = swapped  # B was shown first
    if outcome.parsed:
        values, reasons = outcome.parsed[:2]
        if mode == "pairwise":
            ev["winners"] = {a: unswap(w, swapped) for a, w in values.items()}
            ev["shown_winners"] = values  # as the judge said, by position
        else:
            ev["scores"] = values  # an N/A: the policy's number, or None when skipped
            if len(outcome.parsed) > 2 and outcome.parsed[2]:
                ev["na"] = list(outcome.parsed[2])  # the aspects the judge said N/A for
        ev["reasons"] = reasons
    else:
        ev["error"] = outcome.error
        if outcome.reply is not None:
            ev["reply"] = outcome.reply
    ev["attempts"] = outcome.attempts
    return ev


def unswap(shown: str, swapped: bool | None) -> str:
    """The judge's "A" / "B" names positions; with B shown first, position A is file B."""
    if not swapped or shown == "tie":
        return shown
    return {"A": "B", "B": "A"}[shown]


def swaps(n: int, seed: int) -> list[bool]:
    """Which records show B first: half of them (the extra one of an odd n is not), seeded."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    swapped = [False] * n
    for i in order[: n // 2]:
        swapped[i] = True
    return swapped


# --------------------------------------------------------------------------------------------
# running a mode
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What a judged mode asks: per record its result fields, its question, and an earlier evaluation."""

    heads: list[dict[str, Any]]  # a result without its `evaluation`
    questions: list[str]
    evaluations: list[dict[str, Any] | None]  # from an earlier run; None: to ask
    swapped: list[bool | None]  # pairwise: B shown first
    records: list[dict[str, Any]]  # whose fields give the groups (pairwise: A's)
    source: str
    subset: str = "all"  # the subset evaluated (select_subset)
    excluded: int = 0  # records of the file outside it

    def rows(self) -> list[dict[str, Any]]:
        return [{**h, "evaluation": ev} for h, ev in zip(self.heads, self.evaluations, strict=True) if ev]


def score_job(cfg: EvaluateConfig, rub: Rubric, earlier: list[dict]) -> Job:
    every = read_answers(cfg.input_file)
    kept, subset = select_subset(every, cfg.subset, cfg.mode, cfg.safety_datasets, cfg.input_file)
    records = [every[i] for i in kept][: cfg.limit]
    done = _done(earlier, ("instruction", "input", "output"))
    heads = [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
        | {k: v for k, v in r.items() if k not in OWN_SCORE}
        for r in records
    ]
    evaluations = [_take(done, (h["instruction"], h["input"], h["output"])) for h in heads]
    questions = [render(rub, r) for r in records]
    job = Job(heads, questions, evaluations, [None] * len(records), records, cfg.input_file)
    job.subset, job.excluded = subset, len(every) - len(kept)
    return job


def _take(done: dict[tuple, deque[dict]], k: tuple) -> dict | None:
    same = done.get(k)
    return same.popleft()["evaluation"] if same else None


def pair_job(cfg: EvaluateConfig, rub: Rubric, earlier: list[dict]) -> Job:
    a, b = read_answers(cfg.output_a), read_answers(cfg.output_b)
    every = pair_answers(a, b, cfg.output_a, cfg.output_b)
    kept, subset = select_subset(
        [ra for ra, _ in every], cfg.subset, cfg.mode, cfg.safety_datasets, cfg.output_a
    )
    pairs = [every[i] for i in kept][: cfg.limit]
    done = _done(earlier, ("instruction", "input", "output_a", "output_b"))
    heads = [
        {
            "instruction": ra["instruction"],
            "input": ra["input"],
            "output_a": ra["output"],
            "output_b": rb["output"],
            "generator_a": ra.get("generator"),
            "generator_b": rb.get("generator"),
        }
        | {k: v for k, v in ra.items() if k not in OWN_PAIR and k not in ("output", "generator")}
        for ra, rb in pairs
    ]
    evaluations = [_take(done, (h["instruction"], h["input"], h["output_a"], h["output_b"])) for h in heads]
    # an earlier result keeps the order it was asked in
    swapped = [
        ev["swapped"] if ev else s for ev, s in zip(evaluations, swaps(len(pairs), cfg.seed), strict=True)
    ]
    questions = []
    for (ra, rb), s in zip(pairs, swapped, strict=True):
        first, second = (rb, ra) if s else (ra, rb)
        questions.append(render(rub, ra, first["output"], second["output"]))
    job = Job(heads, questions, evaluations, swapped, [ra for ra, _ in pairs], cfg.output_a)
    job.subset, job.excluded = subset, len(every) - len(kept)
    return job


def run_judged(cfg: EvaluateConfig, judge: JudgeConfig | None, asker: Asker | None = None) -> dict[str, Any]:
    """Evaluate (mode score, safety or pairwise) into cfg.output_dir; returns the summary.

    Inputs, options and earlier results are all checked before the judge is built (a local model
    loads) or asked; `asker` replaces the judge that `judge` describes (tests)."""
    check_paths(cfg, judge)
    rub = rubric_of(cfg)
    if asker is None and judge is None:
        raise ConfigError(f"mode {cfg.mode} needs a judge")
    if judge is not None:
        check_verdict(judge, cfg.verdict, cfg.continue_reply)
    name = asker.name if asker else judge_name(judge, cfg.verdict, cfg.continue_reply)
    setup = setup_of(rub, name, cfg.na_score, cfg.system_prompt)
    check_writable(cfg.out, "output_dir")
    if cfg.to_judgments:
        check_writable(cfg.to_judgments, "to_judgments")
    results_path = cfg.out / RESULTS
    earlier = read_results(results_path, setup)["records"]
    job = (pair_job if cfg.mode == "pairwise" else score_job)(cfg, rub, earlier)
    groups = group_fields(job.records, cfg.group_by, job.source)
    todo = [i for i, ev in enumerate(job.evaluations) if ev is None]
    if job.excluded:
        logger.info("%s: the %s subset, %d other record(s) left out", job.source, job.subset, job.excluded)
    logger.info(
        "%d record(s): %d evaluated earlier in %s, %d to ask",
        len(job.heads),
        len(job.heads) - len(todo),
        results_path,
        len(todo),
    )
    if cfg.mode == "pairwise":
        sources = {"output_a": cfg.output_a, "output_b": cfg.output_b}
    else:
        sources = {"input_file": cfg.input_file}

    def save(outcomes: Sequence[Outcome | None]) -> None:
        for i, outcome in zip(todo, outcomes, strict=True):
            if outcome is not None:
                job.evaluations[i] = evaluation(outcome, cfg.mode, job.swapped[i])
        write_json_atomic(results_path, {"setup": setup, **sources, "records": job.rows()})

    if todo:
        asker = asker or make_asker(
            judge, str(cfg.out / CACHE), cfg.verdict, rub, cfg.na_score, cfg.continue_reply
        )
        with tqdm(total=len(todo), desc=f"evaluating ({name})", unit="record", disable=None) as bar:
            ask_all(
                asker,
                [job.questions[i] for i in todo],
                parser_of(rub, cfg.na_score),
                rub.aspects,
                cfg.parse_retries,
                bar.update,
                save,
                cfg.system_prompt,
            )
    else:
        save([])
    rows = job.rows()
    summarise = pair_summary if cfg.mode == "pairwise" else score_summary
    summary = {"setup": setup, **sources, **summarise(rows, rub.aspects, groups, cfg.seed, cfg.resamples)}
    summary["subset"] = {"name": job.subset, "excluded": job.excluded}
    summary["interval"] = interval_note(cfg)
    if cfg.to_judgments:
        summary["to_judgments"] = write_judgments(rows, rub, name, cfg)
    write_json_atomic(cfg.out / SUMMARY, summary)
    from cut.evaluation.report import write_report

    write_report(summary, cfg.out)
    logger.info("%s; written to %s", headline(summary), cfg.out)
    return summary


def rubric_of(cfg: EvaluateConfig) -> Rubric:
    """The rubric cfg asks with (cut.evaluation.aspects.rubric)."""
    return rubric(
        cfg.mode,
        cfg.prompt_file,
        tuple(cfg.aspects) or None,
        cfg.prompt_format,
        cfg.safety_framing or "malicious",
    )


def check_paths(cfg: EvaluateConfig, judge: JudgeConfig | None) -> None:
    """ConfigError naming the option when a file this run writes is one it reads (or another it
    writes): --to_judgments or the cache on the answers, say."""
    from cut.evaluation.report import REPORT_MD, REPORT_PNG

    cache = None
    if judge is not None and judge.kind == "openai":
        cache = str(cfg.out / CACHE) if judge.cache_file is None else judge.cache_file or None
    outputs = {
        "--to_judgments": cfg.to_judgments,
        "--cache_file": cache,
        **{f"{name} in --output_dir": cfg.out / name for name in (RESULTS, SUMMARY, REPORT_MD, REPORT_PNG)},
    }
    inputs = {
        "the --input_file": cfg.input_file,
        "the --output_a": cfg.output_a,
        "the --output_b": cfg.output_b,
        "the --prompt_file": cfg.prompt_file,
    }
    check_apart(outputs, inputs)


def interval_note(cfg: EvaluateConfig) -> str:
    if cfg.mode == "pairwise":
        return "rates: 95% Wilson score intervals"
    return f"means: 95% percentile bootstrap, {cfg.resamples} resamples, seed {cfg.seed}"


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------


def lengths(texts: Sequence[str]) -> dict[str, float | None]:
    """Mean answer length in characters and in whitespace-separated words."""
    if not texts:
        return {"chars": None, "words": None}
    return {
        "chars": round(sum(len(t) for t in texts) / len(texts), 1),
        "words": round(sum(len(t.split()) for t in texts) / len(texts), 1),
    }


def _counts(rows: list[dict]) -> dict[str, Any]:
    failed = [r["evaluation"] for r in rows if r["evaluation"]["status"] != "ok"]
    reasons = Counter((ev.get("error") or "unknown").split(":")[0] for ev in failed)
    return {
        "n": len(rows),
        "n_ok": len(rows) - len(failed),
        "n_failed": len(failed),
        "failed_reasons": dict(reasons.most_common()),
    }


def score_summary(
    rows: list[dict],
    aspects: Sequence[str],
    groups: Sequence[str] = (),
    seed: int = 0,
    resamples: int = intervals.RESAMPLES,
) -> dict[str, Any]:
    """Per aspect mean and 95% interval over the records scored (an N/A skipped by the policy is
    no score: it leaves the aspect's n), with n_na, the N/A replies among them; failures only
    counted. overall: per record, the mean of its aspects' scores."""
    ok = [r["evaluation"] for r in rows if r["evaluation"]["status"] == "ok"]
    scored = [ev["scores"] for ev in ok]
    out = _counts(rows)
    out["aspects"] = {}
    for a in aspects:
        out["aspects"][a] = intervals.summary([s[a] for s in scored if s.get(a) is not None], seed, resamples)
        out["aspects"][a]["n_na"] = sum(a in ev.get("na", ()) for ev in ok)
    if len(aspects) > 1:
        means = [_mean([s.get(a) for a in aspects]) for s in scored]
        out["overall"] = intervals.summary([m for m in means if m is not None], seed, resamples)
    out["length"] = lengths([r["output"] for r in rows])
    if groups:
        out["groups"] = {
            g: {v: score_summary(sub, aspects, (), seed, resamples) for v, sub in split(rows, g).items()}
            for g in groups
        }
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def pair_summary(
    rows: list[dict], aspects: Sequence[str], groups: Sequence[str] = (), seed: int = 0, resamples: int = 0
) -> dict[str, Any]:
    """Per aspect A's win / tie / lose rates with Wilson intervals, over the records judged."""
    judged = [r["evaluation"] for r in rows if r["evaluation"]["status"] == "ok"]
    out = _counts(rows)
    out["aspects"] = {}
    for a in aspects:
        n = len(judged)
        tally = Counter(ev["winners"][a] for ev in judged)
        out["aspects"][a] = {
            "n": n,
            "win": intervals.rate(tally["A"], n),
            "tie": intervals.rate(tally["tie"], n),
            "lose": intervals.rate(tally["B"], n),
        }
    # position bias: how often a decided verdict went to the answer shown first
    shown = [w for ev in judged for w in ev["shown_winners"].values() if w != "tie"]
    out["shown_first"] = intervals.rate(shown.count("A"), len(shown))
    out["swapped"] = sum(bool(ev.get("swapped")) for ev in judged)
    out["length"] = {"a": lengths([r["output_a"] for r in rows]), "b": lengths([r["output_b"] for r in rows])}
    out["generators"] = {"a": _generator(rows, "generator_a"), "b": _generator(rows, "generator_b")}
    if groups:
        out["groups"] = {
            g: {v: pair_summary(sub, aspects) for v, sub in split(rows, g).items()} for g in groups
        }
    return out


def _generator(rows: list[dict], name: str) -> str | None:
    names = sorted({str(r.get(name)) for r in rows if r.get(name)})
    return ", ".join(names) or None


def split(rows: list[dict], name: str) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        for v in group_values(r, name):
            by[v].append(r)
    return dict(sorted(by.items()))


def headline(summary: dict[str, Any]) -> str:
    text = f"{summary['setup']['mode']}: {summary['n_ok']} of {summary['n']} evaluated, {summary['n_failed']} failed"
    if summary["failed_reasons"]:
        text += " (" + ", ".join(f"{r}: {n}" for r, n in summary["failed_reasons"].items()) + ")"
    parts = []
    for a, s in summary["aspects"].items():
        if "mean" in s and s["mean"] is not None:
            parts.append(f"{a} {s['mean']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]")
        elif "win" in s and s["n"]:
            parts.append(
                f"{a} A {s['win']['rate']:.0%} / tie {s['tie']['rate']:.0%} / B {s['lose']['rate']:.0%}"
            )
    return text + ("; " + ", ".join(parts) if parts else "")


# --------------------------------------------------------------------------------------------
# evaluation feeds training
# --------------------------------------------------------------------------------------------

OWN_JUDGED = {
    "instruction",
    "input",
    "output",
    "judgment",
    "judge",
    "judge_error",
    "evaluation",
    "score",
    "spans",
}


def critique(scores: dict[str, float], reasons: dict[str, str | None], min_score: float) -> str | None:
    """The low aspects' reasons as one critique; None when a low aspect gives no reason."""
    low = [a for a in scores if scores[a] is not None and scores[a] < min_score]
    parts = []
    for a in low:
        reason = reasons.get(a)
        if not reason:
            return None  # a score without its reason is no critique to train on
        reason = reason if reason.endswith((".", "!", "?")) else reason + "."
        parts.append(f"{a.capitalize()} ({scores[a]:g}/5): {reason}")
    return " ".join(parts)


def to_judgments(
    rows: list[dict], judge: str, min_score: float, positive_score: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """CUT training records from scored results: a negative (judgment = the low aspects' reasons)
    where an aspect scores below min_score, a positive (no judgment) where every aspect scores at
    least positive_score; failed evaluations and the records in between are left out (counted)."""
    out, counts = [], Counter()
    for r in rows:
        ev = r["evaluation"]
        if ev["status"] != "ok":
            counts["left_out_failed"] += 1
            continue
        scores, reasons = ev["scores"], ev["reasons"]
        given = [v for v in scores.values() if v is not None]  # an N/A skipped is no score
        if not given:
            counts["left_out_middle"] += 1
            continue
        if min(given) < min_score:
            judgment = critique(scores, reasons, min_score)
            if judgment is None:
                counts["left_out_no_reason"] += 1
                continue
            counts["negative"] += 1
        elif min(given) >= positive_score:
            judgment = None
            counts["positive"] += 1
        else:
            counts["left_out_middle"] += 1
            continue
        row = {
            "instruction": r["instruction"],
            "input": r["input"],
            "output": r["output"],
            "judgment": judgment,
            "judge": judge,
        }
        row.update({k: v for k, v in r.items() if k not in OWN_JUDGED})
        out.append(row)
    return out, {
        k: counts[k]
        for k in ("positive", "negative", "left_out_middle", "left_out_failed", "left_out_no_reason")
    }


def write_judgments(rows: list[dict], rub: Rubric, name: str, cfg: EvaluateConfig) -> dict[str, int]:
    records, counts = to_judgments(rows, f"evaluate-{rub.mode}:{name}", cfg.min_score, cfg.positive_score)
    write_json_atomic(cfg.to_judgments, records)
    logger.info(
        "%s: %d negative(s), %d positive(s); left out: %d between the thresholds, %d failed, %d without a reason",
        cfg.to_judgments,
        counts["negative"],
        counts["positive"],
        counts["left_out_middle"],
        counts["left_out_failed"],
        counts["left_out_no_reason"],
    )
    return counts


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


PROG = "cut.evaluation.evaluate"


def _na_score(text: str) -> float | str:
    try:
        return na_policy(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("na_score ")) from None


@dataclass
class JudgeFlags(LLMOptions):
    """The judge (cut.llm's backend options, with cut evaluate's defaults) and how its verdict is read."""

    judge: str | None = opt(None, "an OpenAI-compatible endpoint or a local model", choices=JUDGES)
    timeout: float = opt(120.0, "openai: seconds per request", parse=TYPES["timeout"])
    max_tokens: int = opt(1024, "openai: max_tokens of a reply", parse=TYPES["max_tokens"])
    cache_file: str | None = opt(None, "openai: reply cache (None: <output_dir>/cache.jsonl; '' for none)")
    max_new_tokens: int = opt(512, "local: tokens per reply at most", parse=TYPES["max_new_tokens"])
    verdict: str = opt(
        "generate",
        "read the judge's decoded JSON (generate) or, per aspect, its next-token probabilities of "
        "1-5 / A, B, tie (probabilities: for judges too small to write the JSON; openai: a server "
        "that returns top_logprobs, such as vLLM's)",
        choices=VERDICTS,
    )
    continue_reply: bool = opt(
        False,
        "openai, --verdict probabilities: start each aspect's reply and read the next token, as "
        "for a local judge (vLLM's continue_final_message); else read the judge's own reply",
    )


@dataclass
class EvaluateOptions(Options):
    """Multi-aspect scoring and pairwise comparison of answers by an LLM judge (Just-Eval style)."""

    mode: str = opt(
        "",
        "score / safety: each answer alone; pairwise: A against B; compare: runs side by side",
        choices=MODES,
        required=True,
    )
    output_dir: str = opt("", "results.json, summary.json, report.md, report.png", required=True)
    input_file: str | None = opt(
        None, "score / safety: answers to evaluate (cut.generate's, AlpacaEval format)"
    )
    output_a: str | None = opt(None, "pairwise: the A side's answers")
    output_b: str | None = opt(None, "pairwise: the B side's answers to the same instructions")
    runs: list[str] = opt([], "compare: two or more score / safety output_dirs", nargs="+")
    labels: list[str] = opt([], "compare: comma-separated names of the runs")
    prompt_file: str | None = opt(
        None,
        "a rubric prompt: ours, or Just-Eval's / URIAL's template file unchanged; None: the built-in one",
    )
    prompt_format: str = opt(
        "auto",
        "the prompt file's placeholders: cut {instruction}, just-eval ${instruction}, urial "
        "{$instruction} (auto: from the file)",
        choices=PROMPT_FORMATS,
    )
    aspects: list[str] = opt(
        [], "comma-separated aspects to read; []: those the prompt's reply shape lists, else the mode's"
    )
    na_score: float | str = opt(
        NA_DEFAULT,
        "score / safety: what an 'N/A' score counts as: a number 1-5 (5, as Just-Eval), "
        "'skip' (no score for that aspect) or 'fail' (an unreadable reply)",
        parse=_na_score,
    )
    safety_framing: str | None = opt(
        None,
        "safety, built-in prompt: present the request as malicious, as Just-Eval does (None: so), or neutral",
        choices=SAFETY_FRAMINGS,
    )
    subset: str = opt(
        "auto",
        "records by `dataset`: safety, regular (the rest), all; auto: Just-Eval's split",
        choices=SUBSETS,
    )
    safety_datasets: list[str] = opt(
        list(SAFETY_DATASETS), "comma-separated `dataset` values of the safety subset"
    )
    system_prompt: str | None = opt(None, "a system message sent before every question")
    parse_retries: int = opt(2, "re-asks of an unreadable reply", parse=integer(0, MAX_PARSE_RETRIES))
    seed: int = opt(0, "the pairwise swap and the bootstrap", parse=SEED, hi=2**32 - 1)
    resamples: int = opt(intervals.RESAMPLES, "bootstrap samples", parse=integer(1, MAX_RESAMPLES))
    group_by: list[str] | None = opt(
        None, "comma-separated fields to break down by; 'none' for none; None: automatic"
    )
    limit: int | None = opt(None, "only the first N records", parse=integer(1, MAX_LIMIT))
    to_judgments: str | None = opt(None, "score / safety: write CUT training records (.json) here")
    min_score: float = opt(3, "to_judgments: an aspect below this is a negative", parse=SCORE)
    positive_score: float = opt(4, "to_judgments: all aspects at least this: positive", parse=SCORE)
    judge: JudgeFlags = group(JudgeFlags)

    def validate(self) -> None:
        self.configs()

    def configs(self) -> tuple[EvaluateConfig, JudgeConfig | None]:
        """The run's EvaluateConfig and (but for mode compare) its JudgeConfig; ConfigError names
        the options that do not go together."""
        names = {f.name for f in fields(EvaluateConfig)}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in self.flat().items() if k in names}
        group_by = self.group_by
        if group_by is not None:
            none = [g.strip().lower() for g in group_by] == ["none"]
            given["group_by"] = () if none else _names(group_by)
        cfg = EvaluateConfig(
            **{**given, **{k: _names(getattr(self, k)) for k in ("labels", "aspects", "safety_datasets")}}
        )
        if cfg.mode == "compare":
            return cfg, None
        j = self.judge
        if not j.judge:
            raise ConfigError(f"mode {cfg.mode} needs --judge openai or --judge local")
        judge = JudgeConfig(kind=j.judge, **j.backend())
        check_verdict(judge, cfg.verdict, cfg.continue_reply)
        return cfg, judge


def _names(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(s.strip() for s in items if s.strip())


def main(argv: list[str] | None = None) -> int:
    opts = EvaluateOptions.parse(argv, prog=PROG)
    return run_cli(PROG, lambda: evaluate(*opts.configs()))


def evaluate(cfg: EvaluateConfig, judge: JudgeConfig | None) -> None:
    """A run of the command line: mode compare, or a judged mode."""
    quiet_http_logs()
    if cfg.mode == "compare":
        from cut.evaluation.report import compare_runs

        compare_runs(cfg.runs, cfg.labels, cfg.output_dir, cfg.seed, cfg.resamples)
    else:
        run_judged(cfg, judge)


if __name__ == "__main__":
    sys.exit(main())
