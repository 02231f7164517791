"""Self-Instruct step 1: grow the pool of instructions from seeds until `--num-instructions` are kept.

Each prompt shows `num_prompt_instructions` examples: `num_machine_in_prompt` sampled from the instructions
kept so far plus seeds for the rest (all seeds until machine ones exist), shuffled. A base model continues the
numbered list (stop at a blank line or at the item after `new_per_prompt` new ones; a completion cut off by
max_tokens is discarded whole, as the reference does); a chat model is asked for `new_per_prompt` new tasks in
JSON. Candidates then go through the heuristic filters and the exact ROUGE-L novelty filter (`Keeper`, shared
with the Alpaca pipeline) in the order their answers arrive.
"""

from __future__ import annotations

import json
from typing import Any

from selfinstruct.parsing import instructions_schema, parse_continued_list, parse_instruction_list
from selfinstruct.parsing import shown as shown_text
from selfinstruct.pipeline.stage import (
    Candidate,
    Growing,
    RunContext,
    Stage,
    TemplateVars,
    numbered,
    prompt_hash,
)
from selfinstruct.prompts import Demo
from selfinstruct.rundir import INSTRUCTIONS, KeptRecord
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

DEMO_LIST = 4
"""Seed instructions in the demonstration's example list (chat prompts; a short list keeps the prompt short)."""


class Bootstrap(Growing):
    stage = "bootstrap"

    @property
    def asked_per_prompt(self) -> int:
        return self.ctx.cfg.new_per_prompt

    def request(self, round_: int, k: int) -> TeacherRequest:
        ctx, cfg, rng = self.ctx, self.ctx.cfg, self.rng
        machine = self.keeper.kept
        n_machine = min(cfg.num_machine_in_prompt, len(machine))
        n_seed = min(cfg.num_prompt_instructions - n_machine, len(self.seeds))
        shown = [(s.id, s.instruction, True) for s in rng.sample(self.seeds, n_seed)]
        shown += [(i, text, False) for i, text in rng.sample(machine, n_machine)]
        rng.shuffle(shown)
        tasks = numbered(shown_text(text) for _, text, _ in shown)
        demos = self.demos(shown) if ctx.chat else []
        messages, prompt = self.template.render(
            demos, tasks=tasks, next=len(shown) + 1, count=cfg.new_per_prompt
        )
        if ctx.chat:
            extra: dict[str, Any] = {
                "json_schema": instructions_schema(cfg.new_per_prompt, cfg.schema_max_chars)
            }
        else:
            end = (
                len(shown) + cfg.new_per_prompt + 1
            )  # the item a base model stops at ("16" in the reference)
            extra = {"stop": ["\n\n", f"\n{end}", f"{end}.", f"{end} ."]}
        tag = {
            "round": round_,
            "prompt_hash": prompt_hash(messages, prompt),
            "seed_ids": [i for i, _, is_seed in shown if is_seed],
            "machine_ids": [i for i, _, is_seed in shown if not is_seed],
        }
        sampling = ctx.sampling(self.stage, (round_, k), **extra)
        return TeacherRequest(messages, prompt, sampling, tag, self.template.marker)

    def demos(self, shown: list[tuple[str, str, bool]]) -> list[Demo]:
        """One worked example from seeds not shown in this prompt: a shorter list and, as its answer,
        `new_per_prompt` other seed instructions in the JSON shape the parser reads."""
        cfg, taken = self.ctx.cfg, {i for i, _, is_seed in shown if is_seed}
        n_others = len(self.seeds) - len(taken)
        n_list = min(DEMO_LIST, n_others // 2)
        n_answer = min(cfg.new_per_prompt, n_others - n_list)
        if n_list < 1 or n_answer < 1:
            return []
        picked = [shown_text(s.instruction) for s in self.other_seeds(n_list + n_answer, taken)]
        answer = json.dumps({"instructions": picked[n_list:]}, ensure_ascii=False)
        return [Demo({"tasks": numbered(picked[:n_list]), "count": n_answer}, answer)]

    def answer(self, response: TeacherResponse) -> int:
        tag = response.request.tag
        round_, where = tag["round"], {"prompt_hash": tag["prompt_hash"]}
        kept = 0
        for choice in response.choices:
            truncated = choice.finish_reason == "length"
            if not self.ctx.chat:
                if truncated:  # the reference discards a base model's completion that hit max_tokens
                    self.keeper.unreadable(choice.text, "truncated", round_, **where)
                    continue
                items = parse_continued_list(choice.text)
                if not items:
                    self.keeper.unreadable(choice.text, "unparseable", round_, **where)
            else:
                parsed = parse_instruction_list(choice.text, truncated=truncated)
                if parsed.unparseable:
                    self.keeper.unreadable(choice.text, "unparseable", round_, parsed.unparseable, **where)
                items = parsed.items
            candidates = [Candidate(text) for text in items]
            kept += self.keeper.offer(candidates, round_, self.provenance(tag), self.target)
        return kept


async def run(ctx: RunContext) -> None:
    await Bootstrap(ctx).run()


STAGE = Stage(
    name="bootstrap",
    run=run,
    templates={"bootstrap": TemplateVars(frozenset({"tasks", "next", "count"}), frozenset({"tasks"}))},
    decoding={
        # the reference's values, tuned for GPT-3 continuing plain text
        "reference": {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0, "max_tokens": 1024},
        # a chat model answering in JSON: a presence penalty punishes the repeated JSON keys, and top_p 0.5
        # narrows an already narrow chat distribution
        "chat": {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 1024},
    },
    output=INSTRUCTIONS,
    record=KeptRecord,
    grows=True,
)
