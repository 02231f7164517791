"""The Alpaca pipeline: one request yields a whole list of complete tasks (instruction, input, output).

Each prompt shows `alpaca_prompt_tasks` seed tasks (only seeds are ever shown, as in the reference) and asks
for `alpaca_new_tasks` more. A base model continues the numbered `Instruction:/Input:/Output:` list (stop at
the item after the last one wanted); a chat model answers in JSON. A truncated answer loses only its last,
cut-off task. Instructions pass the same heuristic and ROUGE-L filters as in the bootstrap (`Keeper`), and a
kept task carries its input/output as its one instance.
"""

from __future__ import annotations

import json
from typing import Any

from selfinstruct.parsing import parse_tasks, shown, tasks_schema
from selfinstruct.pipeline.stage import Candidate, Growing, RunContext, Stage, TemplateVars, prompt_hash
from selfinstruct.prompts import Demo
from selfinstruct.records import Instance, SeedTask
from selfinstruct.rundir import INSTRUCTIONS, KeptRecord
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

DEMO_ANSWER = 3
"""Tasks in the demonstration's answer (chat prompts): enough to show the shape, short enough to stay cheap."""


def format_task(number: int, task: SeedTask) -> str:
    """One task in the numbered list format a base model continues (and the chat prompt shows)."""
    inst = task.instances[0]
    return (
        f"{number}. Instruction: {shown(task.instruction)}\n"
        f"{number}. Input:\n{inst.input.strip() or '<noinput>'}\n"
        f"{number}. Output:\n{inst.output.strip()}"
    )


def task_list(tasks: list[SeedTask]) -> str:
    return "\n###\n".join(format_task(n, t) for n, t in enumerate(tasks, start=1))


class Alpaca(Growing):
    stage = "alpaca"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.shown = min(ctx.cfg.alpaca_prompt_tasks, len(self.seeds))

    @property
    def asked_per_prompt(self) -> int:
        return self.ctx.cfg.alpaca_new_tasks

    def request(self, round_: int, k: int) -> TeacherRequest:
        ctx, cfg = self.ctx, self.ctx.cfg
        shown = self.rng.sample(self.seeds, self.shown)
        demos = self.demos(shown) if ctx.chat else []
        messages, prompt = self.template.render(
            demos, tasks=task_list(shown), next=self.shown + 1, count=cfg.alpaca_new_tasks
        )
        if ctx.chat:
            extra: dict[str, Any] = {"json_schema": tasks_schema(cfg.alpaca_new_tasks, cfg.schema_max_chars)}
        else:
            end = self.shown + cfg.alpaca_new_tasks + 1  # the item a base model stops at
            extra = {"stop": [f"\n{end}", f"{end}.", f"{end} ."]}
        tag = {
            "round": round_,
            "prompt_hash": prompt_hash(messages, prompt),
            "seed_ids": [t.id for t in shown],
        }
        sampling = ctx.sampling(self.stage, (round_, k), **extra)
        return TeacherRequest(messages, prompt, sampling, tag, self.template.marker)

    def demos(self, shown: list[SeedTask]) -> list[Demo]:
        """One worked example from other seeds: a list of tasks and, as its answer, a few more in JSON."""
        taken = {t.id for t in shown}
        n_answer = min(DEMO_ANSWER, self.ctx.cfg.alpaca_new_tasks, len(self.seeds) - len(taken) - self.shown)
        if n_answer < 1:
            return []
        picked = self.other_seeds(self.shown + n_answer, taken)
        answer = [
            {"instruction": t.instruction, "input": t.instances[0].input, "output": t.instances[0].output}
            for t in picked[self.shown :]
        ]
        values = {"tasks": task_list(picked[: self.shown]), "count": n_answer}
        return [Demo(values, json.dumps({"tasks": answer}, ensure_ascii=False))]

    def answer(self, response: TeacherResponse) -> int:
        tag = response.request.tag
        round_ = tag["round"]
        kept = 0
        for choice in response.choices:
            # A base model's text continues "N. Instruction:" from the prompt: put that back before parsing.
            text = choice.text if self.ctx.chat else f"{self.shown + 1}. Instruction:{choice.text}"
            parsed = parse_tasks(text, truncated=choice.finish_reason == "length")
            if parsed.unparseable:
                self.keeper.unreadable(
                    text, "unparseable", round_, parsed.unparseable, prompt_hash=tag["prompt_hash"]
                )
            candidates = [
                Candidate(t.instruction, Instance(t.input, t.output), {"input": t.input, "output": t.output})
                for t in parsed.items
            ]
            kept += self.keeper.offer(candidates, round_, self.provenance(tag), self.target)
        return kept


async def run(ctx: RunContext) -> None:
    await Alpaca(ctx).run()


STAGE = Stage(
    name="alpaca",
    run=run,
    templates={"alpaca": TemplateVars(frozenset({"tasks", "next", "count"}), frozenset({"tasks"}))},
    decoding={
        "reference": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3072},
        "chat": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 3072},
    },
    output=INSTRUCTIONS,
    record=KeptRecord,
    grows=True,
)
