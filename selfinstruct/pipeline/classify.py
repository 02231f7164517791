"""Self-Instruct step 2: is each kept instruction a classification task (finite set of output labels)?

The answer decides how its instances are generated (output-first for classification). The few-shot examples
come from the seed tasks' own `is_classification` labels (the project's labelled seeds when the user's carry
none), chosen once per run (a fixed prompt prefix is also what provider-side prompt caching rewards). Results
go to `classification.jsonl` keyed by instruction id; instructions that already have one are skipped, so the
stage resumes. An answer that is neither yes nor no
is recorded as `null` (treated as "not classification") and counted as a parse failure.
"""

from __future__ import annotations

import json
import random

from selfinstruct.parsing import CLASSIFY_SCHEMA, parse_yes_no, shown
from selfinstruct.pipeline.stage import PerInstruction, RunContext, Stage, TemplateVars
from selfinstruct.prompts import Demo
from selfinstruct.records import SeedTask
from selfinstruct.rundir import CLASSIFICATION, REJECTED, ClassificationRecord
from selfinstruct.seeds import PROJECT_SEEDS, load_seed_tasks
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

EXAMPLES_PER_CLASS = 6


def labelled_seeds(seeds: list[SeedTask]) -> list[SeedTask]:
    """The seed tasks few-shot examples are drawn from: the user's when some are labelled as classification,
    else the project's own labelled set. Alpaca-format seeds carry no labels, and with them alone the classify
    prompt would show only "No" examples and the output-first prompt no classification task at all."""
    return seeds if any(s.is_classification for s in seeds) else load_seed_tasks(PROJECT_SEEDS)


def few_shot(seeds: list[SeedTask], seed: int) -> list[SeedTask]:
    """Up to 6 classification and 6 other seed tasks, shuffled."""
    rng = random.Random(f"{seed}:classify")
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    picked = rng.sample(yes, min(EXAMPLES_PER_CLASS, len(yes))) + rng.sample(
        no, min(EXAMPLES_PER_CLASS, len(no))
    )
    rng.shuffle(picked)
    return picked


def as_text(examples: list[SeedTask]) -> str:
    """The few-shot block of a completion prompt, in the line format the model continues."""
    return "\n\n".join(
        f"Task: {shown(s.instruction)}\nClassification: {'Yes' if s.is_classification else 'No'}"
        for s in examples
    )


def as_demos(examples: list[SeedTask]) -> list[Demo]:
    """The few-shot examples as chat turns answered in the stage's JSON shape."""
    return [
        Demo(
            {"instruction": shown(s.instruction)},
            json.dumps({"is_classification": bool(s.is_classification)}),
        )
        for s in examples
    ]


class Classify(PerInstruction):
    stage = "classify"
    output = CLASSIFICATION

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.template = ctx.prompts.get(self.stage)
        examples = few_shot(labelled_seeds(ctx.seeds), ctx.cfg.seed)
        self.examples, self.demos = ("", as_demos(examples)) if ctx.chat else (as_text(examples), [])

    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        messages, prompt = self.template.render(self.demos, examples=self.examples, instruction=instruction)
        extra = {"json_schema": CLASSIFY_SCHEMA} if self.ctx.chat else {"stop": ["\n"]}
        sampling = self.ctx.sampling(self.stage, rec_id, **extra)
        return TeacherRequest(messages, prompt, sampling, (rec_id, instruction), self.template.marker)

    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> ClassificationRecord:
        text = response.choices[0].text if response.choices else ""
        label = parse_yes_no(text)
        if label is None:
            reject = self.ctx.reject_record(
                self.stage, instruction, "unparseable", 0, id=rec_id, answer=text[:200]
            )
            self.ctx.journal.append(REJECTED, [reject])
        return ClassificationRecord(id=rec_id, is_classification=label)


async def run(ctx: RunContext) -> None:
    await Classify(ctx).run()


STAGE = Stage(
    name="classify",
    run=run,
    templates={"classify": TemplateVars(frozenset({"examples", "instruction"}), frozenset({"instruction"}))},
    decoding={
        "reference": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3},
        # `{"is_classification": false}` does not fit in 3 tokens
        "chat": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 32},
    },
    output=CLASSIFICATION,
    record=ClassificationRecord,
)
