"""`selfinstruct magpie`: seedless instruction synthesis from an aligned chat model (Magpie, arXiv:2406.08464).

An aligned model given only the start of its chat template, up to where a user's message would begin (the
*pre-query*, e.g. `<|im_start|>user\\n` for ChatML), writes a plausible user query itself. Each query is then
answered by the same model with the query as the user turn. No seed tasks and no prompt wording are involved,
so the task distribution is whatever the model habitually writes about; steering system prompts
(`--system-prompt`) and the novelty filter are what keep it varied.

The stages run over one run directory, all resumable from its append-only files:

* `query`: raw prompts (the pre-query, n samples each at temperature 1.0 / top_p 1.0, stopped at the model's
  end-of-turn token). A sample cut off by max_tokens is discarded; the rest go through the repetition check,
  then the same heuristics and exact ROUGE-L novelty filter as `generate` (`Keeper`, against everything kept),
  and land in `instructions.jsonl` / `rejected.jsonl`.
* `answer`: one raw prompt per kept query (the chat template rendered with the same system prompt and the
  query as the user turn, generation prompt added); answers go to `answers.jsonl` keyed by instruction id.
  An empty, cut-off or looping answer is recorded as rejected and leaves its query out of the corpus.
* `followup` (only with `--turns` > 1): further exchanges of each answered conversation (`FollowUps`).

`corpus.jsonl` (Alpaca fields; `messages` for a conversation of several exchanges; `meta.source = "magpie"`) is
rebuilt from those files at the end of each session.

Templates with a built-in default system turn (SmolLM2, Qwen2) render it in the pre-query when no system
prompt is given: the model was aligned with that turn in front of every conversation, so it is part of "the
start of its chat template", and the reference's pre-query strings for such models include it as well.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field
from rich.console import Console

from selfinstruct.config import MaxCost, MaxRequests, MaxTokens, Section, save_config
from selfinstruct.errors import InputFileError, UserError
from selfinstruct.filters import FilterConfig
from selfinstruct.filters.heuristics import Repetitive
from selfinstruct.generate import Monitor
from selfinstruct.models import resolve_model
from selfinstruct.pipeline.runner import Budget, Journal
from selfinstruct.pipeline.session import exit_code, teacher_session
from selfinstruct.pipeline.stage import (
    Candidate,
    Growing,
    Keeper,
    PerInstruction,
    RunContext,
    StageStats,
    head_and_tail,
    prompt_hash,
    read_keyed,
    run_stage,
)
from selfinstruct.prompts import Prompts
from selfinstruct.records import CorpusRecord
from selfinstruct.rundir import CONFIG, CORPUS, INSTRUCTIONS, REJECTED, STATE, SUMMARY
from selfinstruct.store import RunDir, atomic_write_json, atomic_write_text, read_jsonl
from selfinstruct.teachers import Teacher, TeacherConfig, make_teacher, teacher_class
from selfinstruct.teachers.base import TeacherRequest, TeacherResponse

ANSWERS = "answers.jsonl"
FOLLOWUPS = "turns.jsonl"
STAGES = ("query", "answer", "followup")
SENTINEL = "\x00magpie-query\x00"
"""Stands in for the user's message when the chat template is rendered; nothing a template adds contains it."""


class MagpieConfig(Section):
    out: str = Field("outputs/magpie", description="run directory (rerun the same command on it to resume)")
    num_instructions: int = Field(1000, ge=1, description="queries to keep")
    pre_query: str = Field(
        "auto",
        description="auto: the chat template rendered up to the user's message; else this exact text "
        "(\\n and \\t read as newline and tab)",
    )
    tokenizer: str | None = Field(
        None,
        description="model dir, .gguf, built-in name or hub id whose chat template is used (default: --model)",
    )
    system_prompt: str | None = Field(
        None,
        description="file of steering system prompts (one per line, or a JSON list), one sampled per request",
    )
    turns: int = Field(
        1, ge=1, description="user/assistant turns per conversation (more than 1 needs --pre-query auto)"
    )
    queries_per_request: int = Field(
        8, ge=1, description="queries sampled per prompt (n; reference up to 200)"
    )
    query_temperature: float = Field(1.0, ge=0, description="query sampling temperature (reference 1.0)")
    query_top_p: float = Field(1.0, gt=0, le=1, description="query sampling top_p (reference 1.0)")
    query_max_tokens: int = Field(
        256, ge=1, description="max tokens of one query (a longer one is discarded)"
    )
    answer_temperature: float = Field(0.0, ge=0, description="answer temperature (0: greedy; reference 0)")
    answer_top_p: float = Field(1.0, gt=0, le=1, description="answer top_p (reference 1.0)")
    answer_frequency_penalty: float = Field(
        0.3,
        ge=-2,
        le=2,
        description="answer frequency penalty (reference 0; 0.3 stops greedy answers looping to the cap)",
    )
    answer_presence_penalty: float = Field(0.0, ge=-2, le=2, description="answer presence penalty")
    answer_repetition_penalty: float = Field(
        1.0, gt=0, description="answer repetition penalty (1: off; a vLLM extension)"
    )
    answer_min_p: float = Field(0.0, ge=0, le=1, description="answer min_p (0: off; a vLLM extension)")
    answer_max_tokens: int = Field(
        1024, ge=1, description="max tokens of one answer (a longer one is rejected)"
    )
    request_batch: int | None = Field(
        None,
        ge=1,
        description="prompts per teacher call (default: 1 over HTTP; --teacher vllm: a round sized to the target)",
    )
    seed: int = Field(0, description="random seed for system-prompt sampling and per-request teacher seeds")
    max_requests: MaxRequests = None
    max_tokens: MaxTokens = None
    max_cost: MaxCost = None
    patience: int = Field(
        200, ge=1, description="stop after this many query answers in a row without a kept instruction"
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the aligned chat model")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="heuristic and novelty filters")


# ---------------------------------------------------------------- the chat template


def load_tokenizer(
    spec: str, flag: str, trust_remote_code: bool = False, needs_chat_template: bool = True
) -> Any:
    """The tokenizer (with its chat template, unless not `needs_chat_template`) of a model name `resolve_model`
    accepts, or of a directory that holds only tokenizer files."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "tokenizer_config.json").is_file()):
        path = Path(resolve_model(spec, flag, trust_remote_code=trust_remote_code))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, unknown tokenizer class: the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{flag} {spec}: cannot load its tokenizer ({first})") from None
    if needs_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{flag} {spec}: the tokenizer has no chat template (magpie needs an aligned chat model)"
        )
    return tokenizer


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # a template that refuses a system turn, …
        raise UserError(f"the chat template cannot render this conversation: {e}") from None


def _messages(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def render_pre_query(tokenizer: Any, system: str | None = None) -> str:
    """The chat template rendered with a sentinel user message (and `system`, if any), cut at the sentinel."""
    text = _render(tokenizer, _messages(system, SENTINEL), generation_prompt=False)
    if SENTINEL not in text:
        raise UserError("the chat template does not show the user's message verbatim; give --pre-query TEXT")
    return text.split(SENTINEL, 1)[0]


def end_of_turn(tokenizer: Any) -> list[str]:
    """Stop strings: the text that closes a user turn in the template (its special token when it starts with
    one, e.g. `<|im_end|>`, `<|eot_id|>`) and the EOS token."""
    after = _render(tokenizer, _messages(None, SENTINEL), generation_prompt=False).split(SENTINEL, 1)[-1]
    after = after.lstrip(" ")
    special = set(tokenizer.all_special_tokens)
    special.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    stops = [t for t in sorted(special, key=len, reverse=True) if t and after.startswith(t)][:1]
    if not stops and after.strip():
        stops = [after.strip().splitlines()[0]]
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def unescape(text: str) -> str:
    """`\\n` and `\\t` typed on a command line become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load_system_prompts(path: str) -> list[str]:
    """One steering system prompt per non-empty line, or a JSON list of strings."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--system-prompt {p}: cannot read it ({e})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(p, e.lineno, f"not a JSON list of strings ({e.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(s, str) and s.strip() for s in prompts):
            raise InputFileError(p, None, "a JSON file must hold a list of non-empty strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(p, None, "no system prompts in this file")
    return prompts


class ChatFormat:
    """The prompts of both stages: the pre-query per system prompt, and the answer prompt for a query.

    Both are sent as raw text, which the engine or endpoint tokenizes with special tokens added. A tokenizer
    that adds BOS itself (Llama 3) would then give the model two, since the template writes one too, so a
    leading BOS is dropped from the text sent, as vLLM's own chat endpoint does.
    """

    def __init__(self, tokenizer: Any, pre_query: str):
        self.tokenizer = tokenizer
        self.explicit = None if pre_query == "auto" else unescape(pre_query)
        self.stops = end_of_turn(tokenizer)
        bos = tokenizer.bos_token
        doubled = bos and tokenizer(bos).input_ids == [tokenizer.bos_token_id] * 2
        self.bos = bos if doubled else None
        self._pre: dict[str | None, str] = {}

    def _sent(self, text: str) -> str:
        return text[len(self.bos) :] if self.bos and text.startswith(self.bos) else text

    def pre_query(self, system: str | None) -> str:
        """The text sent to have the model write a query (under `system`, if any)."""
        if system not in self._pre:
            text = self.explicit if self.explicit is not None else render_pre_query(self.tokenizer, system)
            self._pre[system] = self._sent(text)
        return self._pre[system]

    def answer_prompt(self, system: str | None, query: str) -> str:
        return self.reply_prompt(_messages(system, query))

    def reply_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation so far, ending with a user turn, rendered for the assistant to answer."""
        return self._sent(_render(self.tokenizer, messages, generation_prompt=True))

    def next_query_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation so far, ending with an assistant turn, rendered up to the next user message."""
        text = _render(
            self.tokenizer, [*messages, {"role": "user", "content": SENTINEL}], generation_prompt=False
        )
        return self._sent(text.split(SENTINEL, 1)[0])


# ---------------------------------------------------------------- the stages


class Queries(Growing):
    """Sample queries from the pre-query and keep the novel ones; pacing and patience as in `generate`."""

    stage = "query"

    def __init__(self, ctx: RunContext, fmt: ChatFormat, systems: list[str | None]):
        # Growing.__init__ would load a prompt template; this stage's only "prompt" is the chat template.
        self.ctx, self.fmt, self.systems = ctx, fmt, systems
        self.keeper = Keeper(ctx, self.stage)
        self.rng = random.Random(f"{ctx.cfg.seed}:{self.stage}:{self.keeper.count}")
        self.target = ctx.cfg.num_instructions
        self.round = self.keeper.max_round + 1
        self.answered = self.kept_now = self.idle = 0
        self.repetitive = Repetitive()
        stats = ctx.stats[self.stage]
        stats.total, stats.done = self.target, self.keeper.count

    @property
    def asked_per_prompt(self) -> int:
        """Queries one prompt asks for (what a growing stage paces its requests by)."""
        return self.ctx.cfg.queries_per_request

    def request(self, round_: int, k: int) -> TeacherRequest:
        system = self.rng.choice(self.systems)
        prompt = self.fmt.pre_query(system)
        tag = {"round": round_, "prompt_hash": prompt_hash(None, prompt), "system_prompt": system}
        sampling = self.ctx.sampling(self.stage, (round_, k), stop=self.fmt.stops)
        return TeacherRequest(prompt=prompt, sampling=sampling, tag=tag)

    def answer(self, response: TeacherResponse) -> int:
        tag = response.request.tag
        round_, where = tag["round"], {"prompt_hash": tag["prompt_hash"]}
        meta = {
            "source": "magpie",
            "teacher_model": self.ctx.teacher.model,
            "system_prompt": tag["system_prompt"],
            "prompt_hash": tag["prompt_hash"],
        }
        candidates = []
        for choice in response.choices:
            text = choice.text.strip()
            if choice.finish_reason == "length":
                self.keeper.unreadable(choice.text, "truncated", round_, **where)
            elif self.repetitive(text):
                self.keeper.unreadable(text, "repetitive", round_, **where)
                self.ctx.stats[self.stage].candidates += 1
            else:
                candidates.append(Candidate(text))
        return self.keeper.offer(candidates, round_, meta, self.target)


class Answers(PerInstruction):
    """Answer every kept query without an answer yet, under the system prompt its query was written with."""

    stage = "answer"
    output = ANSWERS

    def __init__(self, ctx: RunContext, fmt: ChatFormat):
        super().__init__(ctx)
        self.fmt = fmt
        self.system = {
            i: rec["meta"].get("system_prompt") for i, rec in read_keyed(ctx.run, INSTRUCTIONS).items()
        }
        self.repetitive = Repetitive()

    def request(self, rec_id: str, instruction: str) -> TeacherRequest:
        prompt = self.fmt.answer_prompt(self.system.get(rec_id), instruction)
        sampling = self.ctx.sampling(self.stage, rec_id)
        return TeacherRequest(prompt=prompt, sampling=sampling, tag=(rec_id, instruction))

    def answer(self, rec_id: str, instruction: str, response: TeacherResponse) -> dict[str, Any]:
        choice = response.choices[0] if response.choices else None
        text = choice.text.strip() if choice else ""
        reason = None
        if not text:
            reason = "empty_answer"
        elif choice is not None and choice.finish_reason == "length":
            reason = "truncated_answer"
        elif self.repetitive(text):
            reason = "repetitive_answer"
        if reason is not None:
            self.ctx.journal.append(
                REJECTED,
                [
                    self.ctx.reject_record(
                        self.stage, instruction, reason, 0, id=rec_id, output=head_and_tail(text)
                    )
                ],
            )
        return {"id": rec_id, "output": None if reason else text, "rejected": reason}


class FollowUps:
    """Turns 2..`turns` of every conversation whose first answer was accepted: the model writes the user's next
    message from the conversation so far rendered up to the next user turn, then answers it.

    Each step is one request and is appended to `turns.jsonl` as `{id, turn, role, content}` when it is done,
    so a resumed run rebuilds every conversation from the files and continues with its next step. Follow-up
    queries pass the truncation, emptiness and repetition checks (the novelty filter is for first queries); a
    step that fails them is recorded with its reason and ends that conversation.
    """

    stage = "followup"

    def __init__(self, ctx: RunContext, fmt: ChatFormat):
        self.ctx, self.fmt = ctx, fmt
        self.repetitive = Repetitive()
        answers = read_keyed(ctx.run, ANSWERS)
        self.conversations: dict[str, list[dict[str, str]]] = {}
        for rec_id, rec in read_keyed(ctx.run, INSTRUCTIONS).items():
            output = answers.get(rec_id, {}).get("output")
            if output:
                self.conversations[rec_id] = [
                    *_messages(rec["meta"].get("system_prompt"), rec["instruction"]),
                    {"role": "assistant", "content": output},
                ]
        self.ended: set[str] = set()
        for step in read_jsonl(ctx.run / FOLLOWUPS):
            if step.get("rejected"):
                self.ended.add(step["id"])
            elif step["id"] in self.conversations:
                self.conversations[step["id"]].append({"role": step["role"], "content": step["content"]})
        self.busy: set[str] = set()
        stats = ctx.stats[self.stage]
        stats.total = len(self.conversations) * (ctx.cfg.turns - 1)
        stats.done = sum(self._turns(c) - 1 for c in self.conversations.values())

    @staticmethod
    def _turns(messages: list[dict[str, str]]) -> int:
        """Complete user/assistant exchanges."""
        return sum(1 for m in messages if m["role"] == "assistant")

    def _ready(self) -> list[str]:
        return [
            i
            for i, c in self.conversations.items()
            if i not in self.busy and i not in self.ended and self._turns(c) < self.ctx.cfg.turns
        ]

    def next_call(self, in_flight: int) -> list[TeacherRequest] | None:
        ready = self._ready()[: self.ctx.can_send(in_flight)]
        batch = []
        for rec_id in ready:
            messages = self.conversations[rec_id]
            if messages[-1]["role"] == "assistant":
                prompt = self.fmt.next_query_prompt(messages)
                sampling = self.ctx.sampling("followup_query", (rec_id, len(messages)), stop=self.fmt.stops)
            else:
                prompt = self.fmt.reply_prompt(messages)
                sampling = self.ctx.sampling("answer", (rec_id, len(messages)))
            self.busy.add(rec_id)
            batch.append(TeacherRequest(prompt=prompt, sampling=sampling, tag=rec_id))
        return batch or None

    def handle(self, responses: list[TeacherResponse]) -> None:
        steps = []
        for response in responses:
            rec_id = response.request.tag
            self.busy.discard(rec_id)
            if not self.ctx.accept(self.stage, response):
                continue  # tried again on the next call
            messages = self.conversations[rec_id]
            role = "user" if messages[-1]["role"] == "assistant" else "assistant"
            choice = response.choices[0] if response.choices else None
            text = choice.text.strip() if choice else ""
            turn = self._turns(messages) + 1
            reason = None
            if not text:
                reason = "empty_" + role
            elif choice is not None and choice.finish_reason == "length":
                reason = "truncated_" + role
            elif self.repetitive(text):
                reason = "repetitive_" + role
            if reason is not None:
                self.ended.add(rec_id)
                steps.append({"id": rec_id, "turn": turn, "role": role, "content": text, "rejected": reason})
                self.ctx.journal.append(
                    REJECTED,
                    [self.ctx.reject_record(self.stage, head_and_tail(text), reason, turn, id=rec_id)],
                )
                continue
            messages.append({"role": role, "content": text})
            steps.append({"id": rec_id, "turn": turn, "role": role, "content": text, "rejected": None})
            if role == "assistant":
                self.ctx.stats[self.stage].done += 1
        self.ctx.journal.append(FOLLOWUPS, steps)
        self.ctx.on_tick(self.stage)

    def satisfied(self) -> bool:
        """Never before every conversation is done: each answer in flight is a step some conversation needs."""
        return False

    def abandoned(self, requests: list[TeacherRequest]) -> None:
        self.ctx.stats[self.stage].requests += len(requests)

    async def run(self) -> None:
        await run_stage(self.ctx, self.stage, self)
        self.ctx.stats[self.stage].finished = not self._ready()


def write_corpus(run: RunDir) -> int:
    """Rebuild corpus.jsonl from the kept queries and their accepted answers; returns the record count.

    A one-exchange conversation is an Alpaca record. One that went on (`--turns` > 1) is a chat record, as
    `converse` writes them: `messages` holds every exchange (a trailing unanswered user turn left out), so
    `export`, `train` and `stats` see all turns. The steering system prompt stays in `meta.system_prompt` in
    both shapes: it chose the topic, it is not part of the conversation to learn."""
    answers = read_keyed(run, ANSWERS)
    later: dict[str, list[dict[str, str]]] = {}
    for step in read_jsonl(run / FOLLOWUPS):
        if not step.get("rejected"):
            later.setdefault(step["id"], []).append({"role": step["role"], "content": step["content"]})
    records = []
    for rec_id, rec in read_keyed(run, INSTRUCTIONS).items():
        output = answers.get(rec_id, {}).get("output")
        if output:
            meta = {
                "task_id": rec_id,
                "origin": "machine",
                "source": "magpie",
                "system_prompt": rec["meta"].get("system_prompt"),
                "teacher_model": rec["meta"].get("teacher_model"),
            }
            steps = later.get(rec_id, [])
            turns, messages = steps[: len(steps) // 2 * 2], None
            if turns:
                first = [
                    {"role": "user", "content": rec["instruction"]},
                    {"role": "assistant", "content": output},
                ]
                messages = first + turns
                meta["turns"] = len(messages) // 2
            records.append(CorpusRecord(rec["instruction"], "", output, meta, messages))
    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    atomic_write_text(run / CORPUS, text)
    return len(records)


# ---------------------------------------------------------------- run directory, progress, summary


def _open_state(run: RunDir) -> dict[str, Any]:
    path = run / STATE
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable run state ({e}); use another --out") from None
        if state.get("identity", {}).get("command") != "magpie":
            raise UserError(f"{run.path} holds a run of another command; magpie needs another --out")
        return state
    foreign = sorted(p.name for p in run.path.iterdir() if p.name != ".lock")
    if foreign:
        raise UserError(
            f"{run.path} is not empty and is not a magpie run ({foreign[0]}, …); use another --out"
        )
    return {"identity": {"command": "magpie"}, "usage": {}, "elapsed_s": 0.0, "sessions": 0}


def _initial_stats(run: RunDir) -> dict[str, StageStats]:
    """Counters derived from the files, so a resumed run reports the whole run."""
    stats = {stage: StageStats() for stage in STAGES}
    for rec in read_jsonl(run / REJECTED):
        if rec.get("stage") in stats:
            stats[rec["stage"]].rejected[rec.get("reason", "?")] += 1
    q = stats["query"]
    q.candidates = sum(1 for _ in read_jsonl(run / INSTRUCTIONS)) + sum(
        n for r, n in q.rejected.items() if r != "truncated"
    )
    return stats


class MagpieMonitor(Monitor):
    """generate's progress display with magpie's stage labels, summary and closing lines."""

    def __init__(self, ctx: RunContext, state: dict[str, Any], console: Console):
        super().__init__(ctx, state, console)
        self.corpus_records = 0

    def label(self, stage: str) -> str:
        return "kept" if stage == "query" else "answered"

    def summary(self, final: bool) -> dict[str, Any]:
        ctx = self.ctx
        rejected: Counter[str] = Counter()
        for s in ctx.stats.values():
            rejected.update(s.rejected)
        return {
            "pipeline": "magpie",
            "teacher_model": ctx.cfg.teacher.model,
            "target": ctx.cfg.num_instructions,
            "kept": ctx.stats["query"].done,
            "candidates": ctx.stats["query"].candidates,
            "rejected_by_reason": dict(rejected.most_common()),
            "parse_failures": 0,
            **self.teacher_usage(),
            "elapsed_s": self.elapsed(),
            "corpus_records": self.corpus_records,
            "stages": {name: s.to_dict() for name, s in ctx.stats.items()},
            "finished": final and all(s.finished for s in ctx.stats.values()),
            "stop_reason": ctx.stop_reason,
            "sessions": self.state.get("sessions", 1),
        }

    def print_final(self, summary: dict[str, Any], run: RunDir) -> None:
        def line(text: str) -> None:
            self.console.print(text, markup=False, highlight=False)

        status = "finished" if summary["finished"] else f"stopped ({summary['stop_reason'] or 'incomplete'})"
        line(f"\nmagpie {status}: {summary['teacher_model']}")
        line(
            f"  kept          {summary['kept']} / {summary['target']} queries ({summary['candidates']} candidates)"
        )
        answer = summary["stages"]["answer"]
        line(f"  answered      {answer['done']} / {answer['total']}")
        if self.ctx.cfg.turns > 1:
            more = summary["stages"]["followup"]
            line(f"  later turns   {more['done']} / {more['total']}")
        if summary["rejected_by_reason"]:
            line("  rejected      " + ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items()))
        line(
            f"  teacher       {summary['requests']} requests ({summary['failed_requests']} failed), "
            f"{summary['prompt_tokens'] + summary['completion_tokens']:,} tokens, ${summary['cost']:.4f}, "
            f"{summary['elapsed_s']:.1f} s"
        )
        line(f"  corpus        {summary['corpus_records']} records")
        for name in (INSTRUCTIONS, ANSWERS, FOLLOWUPS, REJECTED, CORPUS, SUMMARY):
            if (run / name).exists():
                line(f"  {name:<20} {run / name}")
        if not summary["finished"]:
            line("  rerun the same command to continue")


# ---------------------------------------------------------------- the command


def _check(cfg: MagpieConfig) -> None:
    if not teacher_class(cfg.teacher).in_process and cfg.teacher.api == "chat":
        raise UserError(
            "magpie sends raw prompts, which a chat endpoint does not take: use --api completions "
            "(a /v1/completions endpoint) or --teacher vllm"
        )
    if cfg.turns > 1 and cfg.pre_query != "auto":
        raise UserError("--turns > 1 needs --pre-query auto (later user turns start where the template says)")
    if cfg.system_prompt and cfg.pre_query != "auto":
        raise UserError(
            "--system-prompt needs --pre-query auto (the system turn is rendered by the chat template)"
        )


def run_magpie(cfg: MagpieConfig, *, teacher: Teacher | None = None, console: Console | None = None) -> int:
    """Run (or resume) a Magpie run in `cfg.out`. `teacher`: an already started teacher (tests, notebooks).

    Returns 0 when finished or stopped by a budget cap, 130 when interrupted.
    """
    _check(cfg)
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    systems: list[str | None] = list(load_system_prompts(cfg.system_prompt)) if cfg.system_prompt else [None]
    flag = "--tokenizer" if cfg.tokenizer else "--model"
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher.model, flag, cfg.teacher.trust_remote_code)
    fmt = ChatFormat(tokenizer, cfg.pre_query)
    for system in systems:  # a template that cannot render a system prompt fails before any request
        fmt.pre_query(system)
    with RunDir(cfg.out) as run:
        state = _open_state(run)
        state["sessions"] = state.get("sessions", 0) + 1
        atomic_write_json(run / STATE, state)
        save_config("magpie", cfg, run / CONFIG)
        own_teacher = teacher is None
        the_teacher = teacher or make_teacher(cfg.teacher)
        journal = Journal(run, (INSTRUCTIONS, REJECTED, ANSWERS) + ((FOLLOWUPS,) if cfg.turns > 1 else ()))
        stats = _initial_stats(run)
        ctx = RunContext(
            cfg=cfg,  # type: ignore[arg-type]  # the fields RunContext and the stages read exist here too
            run=run,
            seeds=[],
            teacher=the_teacher,
            prompts=Prompts("completion"),
            journal=journal,
            budget=Budget.resumed(cfg, state.get("usage", {}), the_teacher.stats),
            decoding={
                "query": {
                    "n": cfg.queries_per_request,
                    "temperature": cfg.query_temperature,
                    "top_p": cfg.query_top_p,
                    "max_tokens": cfg.query_max_tokens,
                },
                "answer": {
                    "temperature": cfg.answer_temperature,
                    "top_p": cfg.answer_top_p,
                    "min_p": cfg.answer_min_p,
                    "repetition_penalty": cfg.answer_repetition_penalty,
                    "frequency_penalty": cfg.answer_frequency_penalty,
                    "presence_penalty": cfg.answer_presence_penalty,
                    "max_tokens": cfg.answer_max_tokens,
                },
                "followup_query": {  # one next message per conversation
                    "temperature": cfg.query_temperature,
                    "top_p": cfg.query_top_p,
                    "max_tokens": cfg.query_max_tokens,
                },
            },
            stats=stats,
        )
        monitor = MagpieMonitor(ctx, state, console)
        ctx.on_tick = monitor.tick
        try:
            with monitor:
                asyncio.run(_session(ctx, fmt, systems, own_teacher, console))
        finally:
            journal.close()
            monitor.corpus_records = write_corpus(run)
            summary = monitor.write_final(run)
        monitor.print_final(summary, run)
    return exit_code(ctx)


def _round_size(ctx: RunContext, stage: str, todo: int) -> int | None:
    """`--request-batch`, or for a teacher that takes whole rounds per call (`ctx.request_batch` > 1) a round
    sized to the work left instead of a full one: twice the queries still needed (a first guess of the keep
    rate), or every item left to answer."""
    batch = ctx.request_batch
    if ctx.cfg.request_batch is not None or batch == 1:
        return ctx.cfg.request_batch
    if stage == "query":
        todo = math.ceil(2 * todo / ctx.cfg.queries_per_request)
    return max(1, min(batch, todo))


async def _session(
    ctx: RunContext, fmt: ChatFormat, systems: list[str | None], own_teacher: bool, console: Console
) -> None:
    """Both stages, with Ctrl-C (and SIGTERM) letting the writes finish; a second one interrupts for real."""
    cfg = ctx.cfg
    try:
        async with teacher_session(ctx, own_teacher, console):
            await _stages(ctx, fmt, systems)
    finally:
        ctx.cfg = cfg


async def _stages(ctx: RunContext, fmt: ChatFormat, systems: list[str | None]) -> None:
    """Queries, then answers, then follow-up turns, each call sized to what is left."""
    cfg = ctx.cfg
    queries = Queries(ctx, fmt, systems)
    ctx.cfg = cfg.model_copy(
        update={"request_batch": _round_size(ctx, "query", queries.target - queries.keeper.count)}
    )
    await queries.run()
    if ctx.stop_reason is None:
        await ctx.journal.aflush()
        answers = Answers(ctx, fmt)
        ctx.cfg = cfg.model_copy(update={"request_batch": _round_size(ctx, "answer", len(answers.todo))})
        await answers.run()
    if ctx.stop_reason is None and cfg.turns > 1:
        await ctx.journal.aflush()
        followups = FollowUps(ctx, fmt)
        ctx.cfg = cfg.model_copy(
            update={"request_batch": _round_size(ctx, "answer", len(followups.conversations))}
        )
        await followups.run()
    if cfg.turns == 1:
        ctx.stats["followup"].finished = True  # nothing to do
    ctx.on_tick("answer")
