"""Self-Instruct step 3: up to `max_instances` input/output examples for every kept instruction.

Classification tasks are generated output-first (a class label, then an input that belongs to it), so the
teacher cannot drift towards one label the way it does when it writes the input first; the others input-first.
Few-shot examples are seed tasks of the same kind with their instances (from the project's labelled seeds when
the user's carry no labels), chosen once per run. Results go to `instances.jsonl` keyed by instruction id
(already-done ids are skipped, so the stage resumes); only instructions with a classification record are done,
the others wait for the classify stage. A truncated answer loses its last, cut-off instance; an unreadable one
is recorded with no instances and counted.
"""

from __future__ import annotations

import json
import random
from collections import deque
from typing import Any

from selfinstruct.parsing import instances_schema, parse_instances, shown
from selfinstruct.pipeline.classify import labelled_seeds
from selfinstruct.pipeline.stage import (
    RAW_TEXT_LIMIT,
    PerInstruction,
    RunContext,
    Stage,
    TemplateVars,
    read_keyed,
)
from selfinstruct.prompts import Demo
from selfinstruct.records import SeedTask
from selfinstruct.rundir import CLASSIFICATION, INSTANCES, REJECTED, InstancesRecord
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

EXAMPLE_TASKS = 3
INPUT_FIRST, OUTPUT_FIRST = "instances_input_first", "instances_output_first"


def format_examples(task: SeedTask, output_first: bool) -> str:
    """A seed task with its instances, in the block format the parser reads back."""
    lines = [f"Task: {shown(task.instruction)}"]
    for k, inst in enumerate(task.instances, start=1):
        if output_first:
            lines.append(f"Class label: {inst.output.strip()}")
            if inst.input.strip():
                lines.append(f"Input: {inst.input.strip()}")
        else:
            lines.append(f"Example {k}")
            if inst.input.strip():
                lines.append(f"Input: {inst.input.strip()}")
            lines.append(f"Output: {inst.output.strip()}")
    return "\n".join(lines)


def as_json(task: SeedTask, output_first: bool) -> str:
    """A seed task's instances as the chat answer the stage's schema asks for (a demonstration)."""
    keys = ("label", "input") if output_first else ("input", "output")
    items = [
        dict(
            zip(
                keys,
                (i.output.strip(), i.input.strip()) if output_first else (i.input.strip(), i.output.strip()),
                strict=True,
            )
        )
        for i in task.instances
    ]
    return json.dumps({"instances": items}, ensure_ascii=False)


def few_shot(seeds: list[SeedTask], output_first: bool, seed: int) -> list[SeedTask]:
    """Seed tasks of the same kind (classification or not), chosen once per run."""
    rng = random.Random(f"{seed}:instances:{output_first}")
    same_kind = [s for s in seeds if s.is_classification == output_first] or seeds
    return rng.sample(same_kind, min(EXAMPLE_TASKS, len(same_kind)))


class Instances(PerInstruction):
    stage = "instances"
    output = INSTANCES

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.templates = {False: ctx.prompts.get(INPUT_FIRST), True: ctx.prompts.get(OUTPUT_FIRST)}
        self.examples: dict[bool, str] = {}
        self.demos: dict[bool, list[Demo]] = {}
        examples_from = labelled_seeds(ctx.seeds)
        for kind in (False, True):
            picked = few_shot(examples_from, kind, ctx.cfg.seed)
            if ctx.chat:
                self.examples[kind] = ""
                self.demos[kind] = [
                    Demo({"instruction": shown(s.instruction), "count": len(s.instances)}, as_json(s, kind))
                    for s in picked
                ]
            else:
                self.examples[kind] = "\n\n".join(format_examples(s, kind) for s in picked)
                self.demos[kind] = []
        self.labels = read_keyed(ctx.run, CLASSIFICATION)
        # An instruction the classify stage has not answered yet (its requests failed) waits for a later run:
        # generated now, it would be input-first for good even if it turns out to be classification.
        ready = deque(item for item in self.todo if item[0] in self.labels)
        ctx.stats[self.stage].extra["waiting_for_classification"] = len(self.todo) - len(ready)
        self.todo = ready

    def output_first(self, rec_id: str) -> bool:
        """Classification tasks (per the classify stage; an unreadable answer counts as no) go output-first."""
        return bool(self.labels.get(rec_id, {}).get("is_classification"))

    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        max_instances, output_first = self.ctx.cfg.max_instances, self.output_first(rec_id)
        template = self.templates[output_first]
        messages, prompt = template.render(
            self.demos[output_first],
            examples=self.examples[output_first],
            instruction=instruction,
            count=max_instances,
        )
        if self.ctx.chat:
            extra: dict[str, Any] = {
                "json_schema": instances_schema(max_instances, output_first, self.ctx.cfg.schema_max_chars)
            }
        else:
            extra = {"stop": ["Task:"] if output_first else ["Task:", f"Example {max_instances + 1}"]}
        sampling = self.ctx.sampling(self.stage, rec_id, **extra)
        return TeacherRequest(messages, prompt, sampling, (rec_id, instruction), template.marker)

    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> InstancesRecord:
        output_first = self.output_first(rec_id)
        choice = response.choices[0] if response.choices else None
        text = choice.text if choice else ""
        truncated = choice is not None and choice.finish_reason == "length"
        found = parse_instances(text, output_first, truncated=truncated).items[: self.ctx.cfg.max_instances]
        if not found:
            reject = self.ctx.reject_record(
                self.stage, instruction, "unparseable", 0, id=rec_id, answer=text[:RAW_TEXT_LIMIT]
            )
            self.ctx.journal.append(REJECTED, [reject])
        instances = [{"input": i.input, "output": i.output} for i in found]
        return InstancesRecord(id=rec_id, output_first=output_first, instances=instances)


async def run(ctx: RunContext) -> None:
    await Instances(ctx).run()


_VARS = TemplateVars(frozenset({"examples", "instruction", "count"}), frozenset({"instruction"}))
STAGE = Stage(
    name="instances",
    run=run,
    templates={INPUT_FIRST: _VARS, OUTPUT_FIRST: _VARS},
    decoding={
        "reference": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 1.5, "max_tokens": 300},
        # greedy instance generation makes small models loop (SmolLM2-135M: 10 of 15 tasks survived the corpus
        # stage's rules at temperature 0, 15 of 15 at 0.7)
        "chat": {"temperature": 0.7, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 1024},
    },
    output=INSTANCES,
    record=InstancesRecord,
)
