"""A scripted teacher for `FakeOpenAI`: plausible answers to every generate prompt, deterministic per request.

`PipelineResponder()` answers by the stage marker a request carries (bootstrap, Alpaca, classification, instance
generation; chat or raw completion) and answers in the shape a real model would: JSON when the request carries
a `response_format`, otherwise text — optionally in the messy variants real chat models produce (preambles,
"Task 1:", bullets, bold, code fences). Instructions come from a combinatorial grammar, so most of them are
novel under the ROUGE-L filter while a realistic share is too similar, too short or blacklisted. Answers depend
only on the request body and the responder seed, so a run at concurrency 1 is reproducible end to end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
from collections.abc import Callable
from typing import Any

from selfinstruct.testing.fake_openai import MARKER, Reply

VERBS = "Write Draft Compose Create Outline Summarize Explain Describe Suggest Propose Plan Design Compare Evaluate".split()
DOCS = (
    "short story,limerick,news headline,product review,cover letter,packing list,weekly meal plan,study guide,"
    "job posting,sales pitch,dialogue,riddle,speech opening,tweet,thank-you note,complaint letter,recipe,"
    "workout routine,travel itinerary,lesson plan,quiz,press release,FAQ entry,podcast intro,slogan"
).split(",")
SUBJECTS = (
    "volcanoes,beekeeping,castles,computing,baking,fish,tax returns,remote work,scooters,chess openings,Rome,"
    "glaciers,houseplants,libraries,jazz,climate policy,bird migration,cars,board games,coral reefs,first aid,"
    "solar panels,marathons,coffee,origami,wind turbines,language learning,black holes,street food,sleep,"
    "credit scores,rock climbing,tea,space tourism,composting,fermentation,lighthouses,deserts,cybersecurity,"
    "knitting,kite surfing,recycling,the printing press,honeybees,dinosaurs,energy,typography,retirement savings,"
    "shipping,wildfires,archery,penguins,minimalism,bicycles,earthquakes,elections,vaccines,museums,podcasts,"
    "gardening,photography,inflation,rivers,robots,spreadsheets,poetry,opera,vegetarian cooking,job interviews"
).split(",")
QUALIFIERS = (
    "urban,medieval,modern,ancient,local,global,small-scale,industrial,amateur,professional,digital,rural,"
    "seasonal,sustainable,affordable,Scandinavian,Japanese,Brazilian,underwater,high-altitude,family,student"
).split(",")
AUDIENCES = (
    "a ten-year-old,a busy parent,a retired engineer,first-year students,a skeptical investor,a new employee,"
    "a tourist,a nurse on night shifts,a small bakery owner,a high school teacher,a software developer,a farmer"
).split(",")
TONES = "formal,playful,persuasive,neutral,enthusiastic,concise,friendly,sarcastic,poetic,academic".split(",")
LANGS = "French,Spanish,German,Italian,Portuguese,Dutch,Swedish,Polish".split(",")
CODE = "Python,JavaScript,Go,Rust,SQL,Java,Ruby,C".split(",")
CODE_TASKS = (
    "reverses the words in a sentence,checks whether a string is a palindrome,merges two sorted lists,"
    "counts the vowels in a text,finds the second largest number in a list,removes duplicate lines,"
    "converts Celsius to Fahrenheit,validates an email address,computes a running average,groups items by key"
).split(",")
NUMBERS = "two three four five six seven".split()

TEMPLATES = [
    "{verb} a {doc} about {topic} for {audience}.",
    "{verb} a {tone} {doc} that mentions {topic} and {topic2}.",
    "Explain {topic} to {audience} in {n} sentences.",
    "List {n} surprising facts about {topic} that {audience} would enjoy.",
    "Give {n} tips for {audience} who wants to get started with {topic}.",
    "Rewrite the following paragraph about {topic} in a {tone} tone.",
    "Translate the following sentence about {topic} into {lang}.",
    "Write a {code} function that {code_task}.",
    "Compare {topic} and {topic2} in terms of cost, risk and benefits.",
    "Classify the sentiment of the following review about {topic} as positive or negative.",
    "Decide whether the following statement about {topic} is true or false.",
    "Summarize the following article on {topic} in {n} bullet points.",
    "Extract all the dates mentioned in the following text about {topic}.",
    "What are the main arguments for and against {topic}?",
    "Plan a {n}-day {doc} around {topic} for {audience}.",
    "Brainstorm {n} names for a startup that works on {topic}.",
    "Answer the following question about {topic} in one {tone} paragraph.",
    "Is the following email about {topic} spam or not spam?",
]
# What real models also produce now and then, and the filters must catch.
BAD = [
    "Plot a graph of {topic}.",  # blacklist
    "Write a program that {code_task}.",  # "Write a program"
    "Describe {topic}.",  # too short
    "- {verb} something.",  # punctuation first
    "Draw a picture of {topic}.",  # blacklist
]

_NUMBER = re.compile(r"^\s*\d+\s*\.\s*(.*)$")


CLAUSES = [
    "",
    "",
    "",
    " Keep it under {k} words.",
    " Use a {tone} tone.",
    " Mention at least one example from {topic2}.",
    " Avoid technical jargon.",
    " End with a question for {audience}.",
    " Format the answer as a numbered list.",
    " Include a short title.",
]


def _topic(rng: random.Random) -> str:
    return f"{rng.choice(QUALIFIERS)} {rng.choice(SUBJECTS)}" if rng.random() < 0.6 else rng.choice(SUBJECTS)


def _fill(template: str, rng: random.Random) -> str:
    template += rng.choice(CLAUSES)
    topic, topic2 = _topic(rng), _topic(rng)
    return template.format(
        verb=rng.choice(VERBS),
        doc=rng.choice(DOCS),
        topic=topic,
        topic2=topic2,
        audience=rng.choice(AUDIENCES),
        tone=rng.choice(TONES),
        lang=rng.choice(LANGS),
        code=rng.choice(CODE),
        code_task=rng.choice(CODE_TASKS),
        n=rng.choice(NUMBERS),
        k=rng.choice((30, 50, 80, 100, 150)),
    )


def instruction(rng: random.Random, bad_rate: float = 0.1) -> str:
    """One instruction-like sentence; a share `bad_rate` is of a kind the heuristic filters reject."""
    if rng.random() < bad_rate:
        return _fill(rng.choice(BAD), rng)
    return _fill(rng.choice(TEMPLATES), rng)


def _sentence(rng: random.Random) -> str:
    topic, topic2 = _topic(rng), _topic(rng)
    return rng.choice(
        [
            f"Last week our team finally looked into {topic}, and the results surprised everyone involved.",
            f"Many people confuse {topic} with {topic2}, but the two have little in common.",
            f"I tried {topic} for a month and would not recommend it to anyone without patience.",
            f"The report on {topic} was published on 3 May 2021 and revised on 12 June 2022.",
        ]
    )


class PipelineResponder:
    """Callable for `FakeOpenAI(responder=...)`.

    `messy`: answer chat prompts without `response_format` in varied list formats (else clean JSON).
    `garbage_rate` / `truncate_rate`: share of answers that are unreadable / cut off with finish_reason length.
    `instructions`: the instruction generator (e.g. a richer one for benchmarks).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        messy: bool = False,
        garbage_rate: float = 0.0,
        truncate_rate: float = 0.0,
        instructions: Callable[[random.Random], str] = instruction,
    ):
        self.seed, self.messy = seed, messy
        self.garbage_rate, self.truncate_rate = garbage_rate, truncate_rate
        self.instruction = instructions

    def __call__(self, request: dict[str, Any]) -> str | Reply:
        chat = "messages" in request
        text = "\n".join(m["content"] for m in request["messages"]) if chat else request.get("prompt", "")
        digest = hashlib.sha256(f"{self.seed}:{request.get('seed')}:{text}".encode()).digest()
        rng = random.Random(digest)
        if rng.random() < self.garbage_rate:
            return "".join(rng.choice("#$%&*@!?~^ ,.;:{}[]0123456789") for _ in range(120))
        structured = "response_format" in request
        if request.get("logprobs"):  # only the classify stage's logprob scoring asks for them
            return self._classify_logprobs(text, chat)
        answer = self._answer(text, chat, structured, request, rng)
        if rng.random() < self.truncate_rate:
            return Reply(text=answer[: max(1, len(answer) * 2 // 3)], finish_reason="length")
        return answer

    # -- dispatch by the request's marker (the template it was rendered from) -------------------------
    def _answer(
        self, text: str, chat: bool, structured: bool, request: dict[str, Any], rng: random.Random
    ) -> str:
        marker = request.get(MARKER)
        if marker == "bootstrap":
            if chat:
                return self._bootstrap_chat(text, structured, rng)
            return self._bootstrap_completion(text.rstrip(), request, rng)
        if marker == "alpaca":
            return (
                self._alpaca_chat(text, structured, rng)
                if chat
                else self._alpaca_completion(text, request, rng)
            )
        if marker in ("classify", "classify_score"):
            return self._classify(text, structured) if chat else " " + self._classify(text, False)
        if marker in ("instances_input_first", "instances_output_first"):
            output_first = marker == "instances_output_first"
            json_ = chat and (structured or not self.messy)
            return ("" if chat else "\n") + self._instances(rng, output_first=output_first, json_=json_)
        if marker is None:  # not a pipeline request: the teacher's start-up check ("Say OK.")
            return "OK"
        raise ValueError(f"PipelineResponder: no answer for a request marked {marker!r}")

    # -- bootstrap ------------------------------------------------------------------------------------
    def _bootstrap_chat(self, text: str, structured: bool, rng: random.Random) -> str:
        counts = re.findall(
            r"Write (\d+) new tasks", text
        )  # the last user turn's (demonstrations come first)
        items = [self.instruction(rng) for _ in range(int(counts[-1]) if counts else 7)]
        if structured or not self.messy:
            return json.dumps({"instructions": items})
        style = rng.randrange(6)
        if style == 0:
            return "```json\n" + json.dumps({"instructions": items}, indent=2) + "\n```"
        if style == 1:
            return "Here are some new tasks:\n\n" + "\n".join(f"{k}. {t}" for k, t in enumerate(items, 1))
        if style == 2:
            return (
                "\n".join(f"Task {k}: {t}" for k, t in enumerate(items, 1))
                + "\n\nLet me know if you need more!"
            )
        if style == 3:
            return "\n".join(f"- {t}" for t in items)
        if style == 4:
            return "\n".join(f"**{k}.** {t}" for k, t in enumerate(items, 1))
        return "\n".join(f"{k}) {t}" for k, t in enumerate(items, 1))

    def _bootstrap_completion(self, prompt: str, request: dict[str, Any], rng: random.Random) -> str:
        start = int(re.search(r"(\d+)\.$", prompt).group(1))
        end = _stop_number(request, default=start + 7)
        lines = [" " + self.instruction(rng)]
        lines += [f"{k}. {self.instruction(rng)}" for k in range(start + 1, end)]
        return "\n".join(lines)

    # -- Alpaca ---------------------------------------------------------------------------------------
    def _task(self, rng: random.Random) -> dict[str, str]:
        inst = self.instruction(rng)
        needs_input = "following" in inst
        return {
            "instruction": inst,
            "input": _sentence(rng) if needs_input else "",
            "output": " ".join(_sentence(rng) for _ in range(rng.randint(1, 3))),
        }

    def _alpaca_chat(self, text: str, structured: bool, rng: random.Random) -> str:
        counts = re.findall(r"write (\d+) diverse tasks", text)
        tasks = [self._task(rng) for _ in range(int(counts[-1]) if counts else 20)]
        if structured or not self.messy:
            return json.dumps({"tasks": tasks})
        return "\n###\n".join(
            f"{k}. Instruction: {t['instruction']}\n{k}. Input:\n{t['input'] or '<noinput>'}\n{k}. Output:\n{t['output']}"
            for k, t in enumerate(tasks, 1)
        )

    def _alpaca_completion(self, prompt: str, request: dict[str, Any], rng: random.Random) -> str:
        start = int(re.search(r"(\d+)\. Instruction:\s*$", prompt).group(1))
        end = _stop_number(request, default=start + 17)
        parts = []
        for k in range(start, end):
            t = self._task(rng)
            head = f" {t['instruction']}" if k == start else f"{k}. Instruction: {t['instruction']}"
            parts.append(f"{head}\n{k}. Input:\n{t['input'] or '<noinput>'}\n{k}. Output:\n{t['output']}")
        return "\n###\n".join(parts)

    # -- classification and instances -----------------------------------------------------------------
    def _classify(self, text: str, structured: bool) -> str:
        task = text.rsplit("Task:", 1)[-1].lower()
        yes = any(w in task for w in ("classify", "true or false", "spam", "sentiment"))
        return json.dumps({"is_classification": yes}) if structured else ("Yes" if yes else "No")

    def _classify_logprobs(self, text: str, chat: bool) -> Reply:
        """A teacher leaning towards "No" (log-odds −0.4 on a content-free task) that still ranks the tasks:
        raw log-odds +0.9 for classification tasks, −1.7 for the others; calibrated +1.3 and −1.3."""
        task = text.rsplit("Task:", 1)[-1].split("\n", 1)[0].strip().lower()
        if task in ("n/a", "", "[mask]"):
            yes, no = 0.32, 0.48
        else:
            yes, no = (0.6, 0.24) if self._classify(text, False) == "Yes" else (0.12, 0.66)
        space = "" if chat else " "
        top = {f"{space}Yes": math.log(yes), f"{space}No": math.log(no), "Maybe": math.log(0.05)}
        return Reply(text=max(top, key=top.__getitem__), top_logprobs=top)

    def _instances(self, rng: random.Random, output_first: bool, json_: bool) -> str:
        n = rng.randint(1, 5)
        if output_first:
            labels = ["Positive", "Negative", "True", "False", "Spam", "Not spam"]
            items = [{"label": rng.choice(labels), "input": _sentence(rng)} for _ in range(n)]
            if json_:
                return json.dumps({"instances": items})
            return "\n\n".join(f"Class label: {i['label']}\nInput: {i['input']}" for i in items)
        items = [
            {"input": _sentence(rng) if rng.random() < 0.5 else "", "output": _sentence(rng)}
            for _ in range(n)
        ]
        if json_:
            return json.dumps({"instances": items})
        blocks = []
        for k, i in enumerate(items, 1):
            inp = f"Input: {i['input']}\n" if i["input"] else ""
            blocks.append(f"Example {k}\n{inp}Output: {i['output']}")
        return "\n\n".join(blocks)


def _stop_number(request: dict[str, Any], default: int) -> int:
    """The list item the request's stop sequences end at (e.g. "\\n16" -> 16): the fake server does not stop."""
    for stop in request.get("stop") or []:
        m = re.fullmatch(r"\n(\d+)", stop)
        if m:
            return int(m.group(1))
    return default


SMALL_SEEDS = [
    ("Suggest a name for a cat that loves to sleep in boxes.", "", "Boxer", False),
    (
        "Explain why the sky looks blue during the day.",
        "",
        "Air scatters blue sunlight more than red light.",
        False,
    ),
    (
        "Summarize the paragraph in one sentence.",
        "The town council met on Monday and voted to repair the old bridge before winter.",
        "The council voted to fix the bridge before winter.",
        False,
    ),
    ("Convert the temperature from Celsius to Fahrenheit.", "25 °C", "77 °F", False),
    (
        "Give two reasons to learn a second language as an adult.",
        "",
        "It keeps the mind sharp and opens doors when travelling.",
        False,
    ),
    (
        "Rewrite the sentence in the passive voice.",
        "The chef cooked a wonderful dinner.",
        "A wonderful dinner was cooked by the chef.",
        False,
    ),
    (
        "Create a short packing checklist for a weekend camping trip.",
        "",
        "Tent, sleeping bag, water filter, headlamp, snacks.",
        False,
    ),
    ("Find the largest number in the list.", "3, 17, 8, 12", "17", False),
    (
        "Describe the taste of a ripe mango to someone who never had one.",
        "",
        "Sweet, juicy and a little floral, like peach and pineapple together.",
        False,
    ),
    (
        "Correct the grammar mistakes in the sentence.",
        "She don't like apples.",
        "She doesn't like apples.",
        False,
    ),
    (
        "Propose a weekly schedule for practicing guitar thirty minutes a day.",
        "",
        "Mon chords, Tue scales, Wed songs, Thu rhythm, Fri improvisation.",
        False,
    ),
    ("Answer the trivia question with a single word.", "What is the capital of Japan?", "Tokyo", False),
    (
        "Outline the steps to brew a cup of pour-over coffee.",
        "",
        "Heat water, grind beans, rinse filter, bloom, pour slowly, serve.",
        False,
    ),
    (
        "Turn the list of ingredients into a one-line shopping note.",
        "eggs, milk, flour, butter",
        "Buy eggs, milk, flour and butter.",
        False,
    ),
    (
        "Recommend a board game for four friends who like strategy.",
        "",
        "Try Catan: trading, building and just enough luck.",
        False,
    ),
    ("Calculate the total price of three books at twelve dollars each.", "", "36 dollars", False),
    (
        "Classify the movie review as Positive or Negative.",
        "The plot dragged and the jokes fell flat.",
        "Negative",
        True,
    ),
    ("Decide whether the email is Spam or Not spam.", "You have won a free cruise! Click now.", "Spam", True),
    ("Label the animal as Mammal, Bird or Reptile.", "Penguin", "Bird", True),
    ("Is the statement a Fact or an Opinion?", "Chocolate ice cream is the best flavor.", "Opinion", True),
    ("Tell whether the number is Even or Odd.", "41", "Odd", True),
    ("Identify the language of the greeting: English, Spanish or German.", "Guten Morgen", "German", True),
    (
        "Rate the urgency of the support ticket as Low, Medium or High.",
        "The whole website is down for all customers.",
        "High",
        True,
    ),
    ("Determine if the sentence is a Question or a Statement.", "Are we there yet", "Question", True),
]


def small_seed_tasks() -> list[dict[str, Any]]:
    """24 hand-written seed tasks (8 classification) in the self-instruct seed format, for tests and benchmarks."""
    return [
        {
            "id": f"seed_{k}",
            "name": f"seed_{k}",
            "instruction": instruction,
            "instances": [{"input": input_, "output": output}],
            "is_classification": is_clf,
        }
        for k, (instruction, input_, output, is_clf) in enumerate(SMALL_SEEDS)
    ]


# ---------------------------------------------------------------- `selfinstruct evolve`

_TASK = re.compile(r"^Instruction: (.*)\nInput: (.*)$", re.M)
_TRIGGER = re.compile(r"\[[a-z]+\]")
EVOLVE_CLAUSES = [
    "Answer in at most {n} sentences and give one example.",
    "Explain each step of your reasoning before the final answer.",
    "Include one concrete example involving {topic}.",
    "Compare at least two different approaches and pick one.",
    "Mention one common mistake to avoid and why it happens.",
    "Write for {audience} and avoid all technical jargon.",
    "Format the answer as a table with {n} rows.",
    "Consider what changes if the budget is cut in half.",
]


class EvolveResponder:
    """Callable for `FakeOpenAI(responder=...)`: the teacher of `selfinstruct evolve`.

    It tells the three requests apart by what our templates put in them (the JSON schema's keys, the shape of the
    task block, the line a completion prompt ends with): a rewrite appends a clause to the task (a breadth rewrite
    writes a new one), the judge really compares the two tasks' words, an answer is a few plain sentences.
    Fixture triggers in an instruction (they stay in its rewrites, so a lineage keeps failing):
    `[leak]` rewrite names the evolving prompt · `[copy]` rewrite is its parent · `[equal]` rewrite only adds
    "Please" (the judge says equal) · `[short]` rewrite is too short · `[broken]` rewrite is cut-off JSON ·
    `[sorry]` answer apologises · `[stop]` answer is only stop words · `[flaky]` the first rewrite of any
    `[flaky]` task leaks, later ones are fine · `[twin]` every rewrite is the same task plus a clause.
    `structured`: answer chat rewrites in JSON even without `response_format` (else labelled lines).
    """

    def __init__(self, seed: int = 0, *, structured: bool = True):
        self.seed, self.structured = seed, structured
        self.flaky_done = False
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> str | Reply:
        chat = "messages" in request
        text = "\n".join(m["content"] for m in request["messages"]) if chat else request.get("prompt", "")
        rng = random.Random(hashlib.sha256(f"{self.seed}:{request.get('seed')}:{text}".encode()).digest())
        schema = ((request.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        keys = set(schema.get("properties") or {})
        end = text.rstrip()
        if "equal" in keys or '{"equal": true}' in text or end.endswith("Answer:"):
            return self._judge(text, chat)
        if (
            keys == {"instruction", "input"}
            or '{"instruction": "...", "input": "..."}' in text
            or (not chat and end.endswith("Instruction:"))
        ):
            return self._rewrite(text, chat, bool(keys) or self.structured, rng)
        if chat:
            return self._answer(request["messages"][-1]["content"], rng)
        return " " + self._answer(text.split("### Request:\n", 1)[-1].split("\n\n### Response:")[0], rng)

    def _rewrite(self, text: str, chat: bool, as_json: bool, rng: random.Random) -> str:
        parent, input_ = _TASK.search(text).groups()
        input_ = "" if input_ == "<noinput>" else input_
        triggers = " ".join(_TRIGGER.findall(parent))
        clause = rng.choice(EVOLVE_CLAUSES).format(
            n=rng.choice(NUMBERS), topic=_topic(rng), audience=rng.choice(AUDIENCES)
        )
        new = f"{parent} {clause}"
        if "brand-new task" in text:  # breadth: another task of the same domain
            new = f"{instruction(rng, bad_rate=0.0)} {triggers}".strip()
        if "[flaky]" in parent:
            with self._lock:
                first, self.flaky_done = not self.flaky_done, True
            if first:
                new = f"Rewritten task: {new}"
        if "[leak]" in parent:
            new = f"As the given prompt asks, {new[0].lower()}{new[1:]}"
        if "[copy]" in parent:
            new = parent
        if "[equal]" in parent:
            new = f"Please {parent[0].lower()}{parent[1:]}"
        if "[short]" in parent:
            new = "Do it [short]"
        if "[twin]" in parent:
            new = f"Describe the water cycle to a curious child using {rng.choice(NUMBERS)} short sentences [twin]"
        if "[broken]" in parent:
            return '{"instruction": "' + new[:20]
        if as_json and chat:
            return json.dumps({"instruction": new, "input": input_})
        if chat:
            return f"Here is the harder version:\n\nInstruction: {new}\nInput: {input_ or '<noinput>'}"
        return f" {new}\nInput: {input_ or '<noinput>'}\n"

    def _judge(self, text: str, chat: bool) -> str:
        (first, _), (second, _) = _TASK.findall(text)[:2]
        added = set(second.lower().split()) - set(first.lower().split())
        equal = added <= {"please"}
        return json.dumps({"equal": equal}) if chat else (" Yes" if equal else " No")

    def _answer(self, prompt: str, rng: random.Random) -> str:
        if "[sorry]" in prompt:
            return "I'm sorry, but I can't help with that request."
        if "[stop]" in prompt:
            return "It is what it is, and that is that."
        return " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))


class MagpieResponder:
    """Callable for `FakeOpenAI(responder=...)` that plays an aligned chat model behind `/v1/completions`.

    A prompt that ends where a user turn starts (ChatML `<|im_start|>user\\n`) gets `n` queries from the
    instruction grammar; a prompt that ends with the assistant's turn gets an answer that names its query.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, request: dict[str, Any]) -> str | list[str]:
        prompt = request.get("prompt", "")
        rng = random.Random(hashlib.sha256(f"{self.seed}:{request.get('seed')}:{prompt}".encode()).digest())
        if prompt.endswith("<|im_start|>user\n"):
            return [instruction(rng) for _ in range(int(request.get("n") or 1))]
        query = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        return f"Here is my answer to '{query}': {_sentence(rng)}"


FOLLOW_UPS = [
    "Can you give {n} concrete examples of {topic} for {audience}?",
    "How would that change for {audience} on a tight budget?",
    "Could you rewrite the answer as {n} bullet points about {topic}?",
    "Why does {topic} matter here, in plain words?",
    "What are the most common mistakes people make with {topic}?",
    "Make it shorter and add one tip about {topic} for {audience}.",
    "Switching topics a little: how is {topic} related to {topic2}?",
    "Which sources would you recommend to learn more about {topic}?",
]


class ConverseResponder:
    """Callable for `FakeOpenAI(responder=...)`: both roles of `selfinstruct converse` (chat or completions).

    A user-simulator request (the chat prompt asks for "the user's next message"; a completion prompt ends
    with "User:") gets a follow-up question from a small grammar; anything else gets an answer of a few
    sentences. Triggers in the conversation's first user turn: `[leak]` the simulator writes two turns
    ("User: … Assistant: …") · `[refuse]` it refuses · `[empty]` it writes nothing · `[repeat]` it repeats the
    first question · `[flaky]` its first attempt of each conversation leaks, later ones are fine · `[label]`
    it prefixes its message with "User:" (cleaned, kept) · `[mute]` every answer after the first is empty.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._flaky: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> str:
        chat = "messages" in request
        text = "\n".join(m["content"] for m in request["messages"]) if chat else request.get("prompt", "")
        rng = random.Random(hashlib.sha256(f"{self.seed}:{request.get('seed')}:{text}".encode()).digest())
        simulating = text.rstrip().endswith(("Write the user's next message.", "User:"))
        first = _first_user_turn(request, text)
        if not simulating:
            if (
                "[mute]" in first
                and text.count("Assistant:")
                + sum(m["role"] == "assistant" for m in request.get("messages", []))
                >= 1
            ):
                return ""
            return " ".join(_sentence(rng) for _ in range(rng.randint(2, 3)))
        question = rng.choice(FOLLOW_UPS).format(
            n=rng.choice(NUMBERS), topic=_topic(rng), topic2=_topic(rng), audience=rng.choice(AUDIENCES)
        )
        if "[flaky]" in first:
            with self._lock:
                fresh = first not in self._flaky
                self._flaky.add(first)
            if fresh:
                return f"{question}\nAssistant: Sure, here it is."
        if "[leak]" in first:
            return f"{question}\n\nAssistant: Of course! Here are some ideas.\n\nUser: Thanks!"
        if "[refuse]" in first:
            return "I'm sorry, but I can't continue this conversation."
        if "[empty]" in first:
            return ""
        if "[repeat]" in first:
            return first
        if "[label]" in first:
            return f"User: {question}"
        return question


def _first_user_turn(request: dict[str, Any], text: str) -> str:
    """The conversation's opening question, from the transcript (or the chat messages of an answer request)."""
    m = re.search(r"^User: (.*)$", text, re.M)
    if m:
        return m.group(1)
    users = [m["content"] for m in request.get("messages", []) if m["role"] == "user"]
    return users[0] if users else ""


_QUALITY = re.compile(r"\(quality (\d)\)")


def quality(answer: str) -> int:
    """The quality `PrefsResponder` wrote into an answer it sampled (3 for any other text)."""
    m = _QUALITY.search(answer)
    return int(m.group(1)) if m else 3


class PrefsResponder:
    """Callable for `FakeOpenAI(responder=...)`: the policy and the judge of `selfinstruct prefs` at once.

    As a policy (a plain user turn) it returns `n` answers, each stating its own quality 1-5 as
    "(quality Q)" (drawn from the request seed and prompt). As the absolute judge it grades every aspect with the
    answer's quality (`quality()`), as the pairwise judge it names the answer of higher quality (tie if equal).
    Fixture triggers in an instruction: `[garbled]` the judge answers in words without any score or verdict ·
    `[biased]` the pairwise judge always says "A" (pure position bias) · `[same]` all answers have quality 3.
    `prose`: grade in words ("Helpfulness: 4, …", "Answer B is better") instead of JSON.
    """

    def __init__(self, seed: int = 0, *, prose: bool = False):
        self.seed, self.prose = seed, prose

    def __call__(self, request: dict[str, Any]) -> str | list[str]:
        text = "\n".join(m["content"] for m in request["messages"])
        rng = random.Random(hashlib.sha256(f"{self.seed}:{request.get('seed')}:{text}".encode()).digest())
        if "### Assistant answer" in text:
            return self._grade(text)
        if "### Answer A" in text:
            return self._compare(text)
        same = "[same]" in text
        return [
            f"Answer {k} (quality {3 if same else rng.randint(1, 5)}): {_sentence(rng)}"
            for k in range(int(request.get("n") or 1))
        ]

    def _grade(self, text: str) -> str:
        if "[garbled]" in text:
            return "This answer is quite something, I must say."
        answer = text.split("### Assistant answer\n", 1)[1].rsplit("\n\nReply with", 1)[0]
        q = quality(answer)
        if self.prose:
            return f"Helpfulness: {q}/5. Honesty - {q}. Instruction following: {q}."
        return json.dumps({"helpfulness": q, "honesty": q, "instruction_following": q})

    def _compare(self, text: str) -> str:
        if "[garbled]" in text:
            return "Both answers have their charms."
        first = text.split("### Answer A\n", 1)[1].split("\n\n### Answer B", 1)[0]
        second = text.split("### Answer B\n", 1)[1].rsplit("\n\nReply with", 1)[0]
        qa, qb = quality(first), quality(second)
        better = "A" if "[biased]" in text or qa > qb else "B" if qb > qa else "tie"
        if self.prose:
            return "Neither is better: tie." if better == "tie" else f"Answer {better} is better."
        return json.dumps({"better": better})


class SignalOnFirstRequest:
    """Wrap a responder: the first request sends `sig` to this very process (as `kill` would) and is answered
    only after `delay` seconds, so the command is stopped with a request in flight."""

    def __init__(self, inner: Callable[[dict[str, Any]], str | Reply], sig: int, delay: float = 1.0):
        self.inner, self.sig, self.delay = inner, sig, delay
        self._sent = threading.Event()

    def __call__(self, request: dict[str, Any]) -> str | Reply:
        answer = self.inner(request)
        if self._sent.is_set():
            return answer
        self._sent.set()
        os.kill(os.getpid(), self.sig)
        return Reply.slow(self.delay, answer if isinstance(answer, str) else None)
