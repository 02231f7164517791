"""Self-Instruct step 2: is each kept instruction a classification task (finite set of output labels)?

The answer decides how its instances are generated (output-first for classification). The few-shot examples
come from the seed tasks' own `is_classification` labels (the project's labelled seeds when the user's carry
none), chosen once per run (a fixed prompt prefix is also what provider-side prompt caching rewards). Results
go to `classification.jsonl` keyed by instruction id; instructions that already have one are skipped, so the
stage resumes.

Two ways to decide (`--classify-scoring`):
- `label` (the reference): the teacher writes its answer; one that is neither yes nor no is recorded as `null`
  (treated as "not classification") and counted as a parse failure. A small model's written label is mostly
  its bias.
- `logprob`: one 1-token request per task for the teacher's top-k first tokens; the score is
  log P(yes) − log P(no), each side summed over its spellings (" Yes", "yes", …). With `--classify-calibrate`
  (contextual calibration, Zhao et al. 2021, "Calibrate Before Use") the mean score of the same prompt on
  content-free tasks ("N/A", "", "[MASK]") is subtracted first, which removes the prompt's own lean towards one
  answer without any labelled data. The task is classification when the score is above 0; the score goes into
  the record. The content-free scores are asked for (3 requests) and reported in `summary.json` either way:
  they show the prompt's lean, and they check up front that the teacher returns logprobs at all. They are
  requests like any other (budget caps, usage and cost, `--batch-api`: the first batch carries them), and the
  measured scores are kept in `state.json` under the fingerprint of the exact requests, so a resumed run (or a
  shard copied from a run that calibrated) sends them again only when the model, prompt or examples changed.
Measured on SmolLM2-135M against the 209 seed tasks' labels (benchmarks/bench_quality.py): the written label is
no better than a constant answer (balanced accuracy 0.50); calibrated logprob scoring reaches 0.77 with chat
prompts and 0.68 with raw prompts, so it is the default.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from selfinstruct.corpus import load_seed_tasks
from selfinstruct.errors import UserError
from selfinstruct.parsing import CLASSIFY_SCHEMA, parse_yes_no, shown
from selfinstruct.pipeline.stage import PerInstruction, RunContext, Stage, TemplateVars
from selfinstruct.prompts import Demo
from selfinstruct.records import SeedTask
from selfinstruct.rundir import CLASSIFICATION, REJECTED, ClassificationRecord
from selfinstruct.seeds import PROJECT_SEEDS
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

EXAMPLES_PER_CLASS = 6
SCORED_EXAMPLES_PER_CLASS = 10
"""Logprob scoring shows more worked examples: on SmolLM2-135M (chat) 3, 6 and 10 per class ranked the seed
tasks with ROC AUC 0.74, 0.77 and 0.84 (raw prompts: 0.53 with 6, 0.66 with 10); one 1-token answer makes the
longer prompt cheap."""
TOP_LOGPROBS = 20  # the most OpenAI's API and vLLM's default `max_logprobs` allow
CONTENT_FREE = ("N/A", "", "[MASK]")
"""Tasks that say nothing (Zhao et al. 2021): the prompt's score on them is its bias."""
CONTENT_FREE_ID = "content-free-"
"""The id prefix of a calibration request's tag (an instruction id never starts with it)."""
CALIBRATION_STATE = "classify_calibration"
"""The key of `state.json` that keeps the measured content-free scores."""
_YES, _NO = frozenset({"yes"}), frozenset({"no"})
_NO_MASS = 1e-12  # probability left for tokens outside the top k when the top k take it all


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def yes_no_score(top: dict[str, float]) -> float:
    """log P(yes) − log P(no) from a first token's top-k {token: logprob}, spellings of each answer summed.

    An answer absent from the top k gets an upper bound on its probability: the smaller of the k-th logprob and
    the mass the top k leave over (so a model sure of "Yes" scores high rather than 0)."""
    yes, no = [], []
    for token, logprob in top.items():
        word = token.strip().lstrip("Ġ▁").strip().lower()
        (yes if word in _YES else no if word in _NO else []).append(logprob)
    left = 1.0 - sum(math.exp(v) for v in top.values())
    floor = min([*top.values(), math.log(max(left, _NO_MASS))])
    return (_logsumexp(yes) if yes else floor) - (_logsumexp(no) if no else floor)


def labelled_seeds(seeds: list[SeedTask]) -> list[SeedTask]:
    """The seed tasks few-shot examples are drawn from: the user's when some are labelled as classification,
    else the project's own labelled set. Alpaca-format seeds carry no labels, and with them alone the classify
    prompt would show only "No" examples and the output-first prompt no classification task at all."""
    return seeds if any(s.is_classification for s in seeds) else load_seed_tasks(PROJECT_SEEDS)


def few_shot(seeds: list[SeedTask], seed: int, per_class: int = EXAMPLES_PER_CLASS) -> list[SeedTask]:
    """Up to `per_class` classification and as many other seed tasks, shuffled."""
    rng = random.Random(f"{seed}:classify")
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    picked = rng.sample(yes, min(per_class, len(yes))) + rng.sample(no, min(per_class, len(no)))
    rng.shuffle(picked)
    return picked


def as_text(examples: list[SeedTask]) -> str:
    """The few-shot block of a completion prompt, in the line format the model continues."""
    return "\n\n".join(
        f"Task: {shown(s.instruction)}\nClassification: {'Yes' if s.is_classification else 'No'}"
        for s in examples
    )


def as_json(task: SeedTask) -> str:
    """A chat demo's answer in the label-writing prompt's JSON shape."""
    return json.dumps({"is_classification": bool(task.is_classification)})


def yes_no(task: SeedTask) -> str:
    """A chat demo's answer for logprob scoring: the label is the first token."""
    return "Yes" if task.is_classification else "No"


def as_demos(examples: list[SeedTask], answer: Callable[[SeedTask], str] = as_json) -> list[Demo]:
    """The few-shot examples as chat turns answered by `answer(task)`."""
    return [Demo({"instruction": shown(s.instruction)}, answer(s)) for s in examples]


class Classify(PerInstruction):
    stage = "classify"
    output = CLASSIFICATION

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.logprob = ctx.cfg.classify_scoring == "logprob"
        # logprob scoring needs the answer's first token to be the label: chat demos answer a bare Yes/No, while
        # the raw prompt's examples already end in "Classification: Yes", so raw text scores with its own template
        self.template = ctx.prompts.get("classify_score" if self.logprob and ctx.chat else self.stage)
        per_class = SCORED_EXAMPLES_PER_CLASS if self.logprob else EXAMPLES_PER_CLASS
        examples = few_shot(labelled_seeds(ctx.seeds), ctx.cfg.seed, per_class)
        answers = yes_no if self.logprob else as_json
        self.examples, self.demos = ("", as_demos(examples, answers)) if ctx.chat else (as_text(examples), [])
        self.calibration = [self.request(f"{CONTENT_FREE_ID}{i}", t) for i, t in enumerate(CONTENT_FREE)]
        self.fingerprint = calibration_fingerprint(ctx.teacher.model, self.calibration)
        cached = ctx.state.get(CALIBRATION_STATE) or {}
        self.scores: list[float] | None = cached.get("content_free_scores")
        if not self.logprob or cached.get("fingerprint") != self.fingerprint:
            self.scores = None
        self.content_free: dict[str, float] = {}  # this session's calibration answers by tag id
        self.unsent = deque(self.calibration if self.logprob and self.scores is None else [])
        self.offset = 0.0
        if self.scores is not None:
            self._apply(self.scores, cached=True)

    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        messages, prompt = self.template.render(self.demos, examples=self.examples, instruction=instruction)
        if self.logprob:
            extra: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS}
        else:
            extra = {"json_schema": CLASSIFY_SCHEMA} if self.ctx.chat else {"stop": ["\n"]}
        sampling = self.ctx.sampling(self.stage, rec_id, **extra)
        return TeacherRequest(messages, prompt, sampling, (rec_id, instruction), self.template.marker)

    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> ClassificationRecord:
        if self.logprob:
            score = yes_no_score(response.choices[0].top_logprobs or {}) - self.offset
            return ClassificationRecord(id=rec_id, is_classification=score > 0, score=round(score, 4))
        text = response.choices[0].text if response.choices else ""
        label = parse_yes_no(text)
        if label is None:
            reject = self.ctx.reject_record(
                self.stage, instruction, "unparseable", 0, id=rec_id, answer=text[:200]
            )
            self.ctx.journal.append(REJECTED, [reject])
        return ClassificationRecord(id=rec_id, is_classification=label)

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        """The content-free requests first (only when there is something to score). A direct run waits for
        their answers, which also checks that the teacher gives logprobs before the tasks are sent; a batch
        carries them along with the tasks (its answers are handled together, calibration first)."""
        if self.logprob and self.scores is None and self.todo:
            n = min(self.ctx.can_send(in_flight), len(self.unsent))
            if n:
                return [self.unsent.popleft() for _ in range(n)]
            if not self.ctx.cfg.teacher.batch_api:
                return None
        return super().next_call(in_flight)

    def handle(self, responses: list[TeacherResponse]) -> None:
        calibration = [r for r in responses if r.request.tag[0].startswith(CONTENT_FREE_ID)]
        if calibration:
            self.calibrate(calibration)
        tasks = [r for r in responses if not r.request.tag[0].startswith(CONTENT_FREE_ID)]
        if tasks and self.logprob and self.scores is None:  # never scored from an unknown offset
            raise UserError("classify: task answers arrived before the calibration's; rerun the command")
        super().handle(tasks)

    def calibrate(self, responses: list[TeacherResponse]) -> None:
        """Count the content-free answers like any other; once all are in, their scores give the offset, and
        `state.json` keeps them (written through the journal, so before any later answer counts)."""
        for response in responses:
            if not self.ctx.accept(self.stage, response):
                raise UserError(
                    f"classify calibration failed ({response.error}); a teacher without logprobs needs "
                    "--classify-scoring label"
                )
            self.content_free[response.request.tag[0]] = yes_no_score(response.choices[0].top_logprobs or {})
        if len(self.content_free) < len(CONTENT_FREE):
            return
        scores = [self.content_free[f"{CONTENT_FREE_ID}{i}"] for i in range(len(CONTENT_FREE))]
        self._apply(scores, cached=False)
        self.ctx.state[CALIBRATION_STATE] = {
            "fingerprint": self.fingerprint,
            "content_free_scores": scores,
        }
        self.ctx.save_state()

    def _apply(self, scores: list[float], cached: bool) -> None:
        self.scores = scores
        offset = sum(scores) / len(scores)
        applied = self.ctx.cfg.classify_calibrate
        self.offset = offset if applied else 0.0
        self.ctx.stats[self.stage].extra["calibration"] = {
            "content_free_scores": [round(x, 4) for x in scores],
            "offset": round(offset, 4),
            "applied": applied,
            "cached": cached,
        }

    async def run(self) -> None:
        if self.logprob and self.todo and not self.ctx.teacher.supports_logprobs:
            raise UserError("this teacher gives no logprobs: use --classify-scoring label")
        await super().run()


def calibration_fingerprint(model: str, requests: list[TeacherRequest]) -> str:
    """What the content-free scores depend on: the model and the exact requests (prompt, examples, decoding;
    not the per-request seed, which greedy decoding ignores and which depends on the backend)."""
    data = [model, *([r.messages, r.prompt, {**asdict(r.sampling), "seed": None}] for r in requests)]
    return hashlib.blake2b(json.dumps(data).encode(), digest_size=8).hexdigest()


async def run(ctx: RunContext) -> None:
    await Classify(ctx).run()


STAGE = Stage(
    name="classify",
    run=run,
    templates={
        "classify": TemplateVars(frozenset({"examples", "instruction"}), frozenset({"instruction"})),
        # the chat prompt of logprob scoring
        "classify_score": TemplateVars(
            frozenset({"examples", "instruction"}), frozenset({"instruction"}), frozenset({"chat"})
        ),
    },
    decoding={
        "reference": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3},
        # `{"is_classification": false}` does not fit in 3 tokens
        "chat": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 32},
    },
    output=CLASSIFICATION,
    record=ClassificationRecord,
)
