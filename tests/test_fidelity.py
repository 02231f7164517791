"""Regression tests for the fidelity fixes of issue 11 (one or more per item, named `test_item<N>_...`), and the
acceptance run: a seed file in the reference repository's exact schema and quirks goes through generate, filter,
split, train and stats with no special case."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from selfinstruct import cli
from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.records import CorpusRecord, Instance
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI, Reply
from selfinstruct.testing.responders import PipelineResponder, small_seed_tasks


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def gen_config(
    seeds: Path, out: Path, server: FakeOpenAI, teacher: dict | None = None, **kw
) -> GenerateConfig:
    t = {"model": server.models[0], "base_url": [server.url], "api_key_env": "", "concurrency": 4}
    t.update({"max_retries": 0, "backoff": 0.01, "timeout": 5.0, **(teacher or {})})
    return GenerateConfig(
        seeds=str(seeds),
        out=str(out),
        num_instructions=kw.pop("num_instructions", 6),
        teacher=TeacherConfig(**t),
        **kw,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    return jsonl(tmp_path / "seeds.jsonl", small_seed_tasks())


# ---------------------------------------------------------------- 1. Alpaca parser: numbered markers only


def test_item1_numbered_tasks_split_only_on_their_own_markers():
    from selfinstruct.parsing import TaskDraft, parse_tasks

    text = (
        "4. Instruction: Write a Python function that doubles every number in a list.\n4. Input:\n<noinput>\n"
        "4. Output:\ndef double(xs):\n    return [2 * x for x in xs]\n\nExample:\nInput: [1, 2]\nOutput: [2, 4]\n"
        "###\n"
        "5. Instruction: Show how to draw a horizontal rule in Markdown.\n5. Input:\n<noinput>\n5. Output:\n"
        "---\nThree dashes on a line of their own render as a rule.\n"
        "###\n"
        "6. Instruction: Give an example of a numbered recipe step.\n6. Input:\n<noinput>\n6. Output:\n"
        "3. Output: the dough should rest for an hour.\n###\n"
    )
    parsed = parse_tasks(text)
    assert parsed.unparseable == 0
    assert parsed.items == [
        TaskDraft(
            "Write a Python function that doubles every number in a list.",
            "",
            "def double(xs):\n    return [2 * x for x in xs]\n\nExample:\nInput: [1, 2]\nOutput: [2, 4]",
        ),
        TaskDraft(
            "Show how to draw a horizontal rule in Markdown.",
            "",
            "---\nThree dashes on a line of their own render as a rule.",
        ),
        TaskDraft(
            "Give an example of a numbered recipe step.", "", "3. Output: the dough should rest for an hour."
        ),
    ]
    # a cut-off answer still loses only its last task
    assert parse_tasks(text[: text.index("6. Output:")], truncated=True).items == parsed.items[:2]


# ---------------------------------------------------------------- 2 and 9. EOS vs end of turn; merged models


@pytest.fixture(scope="module")
def base_like_model(tmp_path_factory) -> Path:
    """A tiny model that looks like Qwen2.5/Llama-3 base: a ChatML template, but EOS `<|endoftext|>`."""
    from selfinstruct.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("base-like"), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def stop_corpus(tmp_path_factory) -> Path:
    rows = [
        {"instruction": f"Say the word {w}.", "input": "", "output": w, "meta": {"task_id": f"t{k}"}}
        for k, w in enumerate("red green blue black white pink gray gold".split())
    ]
    return jsonl(tmp_path_factory.mktemp("stop-corpus") / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def lora_merged(base_like_model, stop_corpus, tmp_path_factory, one_torch_thread):
    from selfinstruct.train import TrainConfig, train

    out = tmp_path_factory.mktemp("lora-merged")
    cfg = TrainConfig(
        data=str(stop_corpus), model=str(base_like_model), out=str(out), lora=True, merge=True,
        max_steps=1, batch_size=4, grad_accum=1,
    )  # fmt: skip
    return train(cfg)


def _eos_ids(model_dir: Path) -> list[int]:
    ids = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    return ids if isinstance(ids, list) else [ids]


def test_item2_end_of_turn_token_is_what_a_tuned_base_model_stops_on(
    base_like_model, stop_corpus, tmp_path, lora_merged, one_torch_thread
):
    from transformers import AutoTokenizer

    from selfinstruct.train import TrainConfig, build_trainer, train

    tok = AutoTokenizer.from_pretrained(base_like_model)
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    cfg = TrainConfig(
        data=str(stop_corpus), model=str(base_like_model), out=str(tmp_path / "full"), max_steps=1,
        batch_size=4, grad_accum=1,
    )  # fmt: skip
    full = Path(train(cfg).out)
    assert im_end in _eos_ids(full)  # HF generate and vLLM stop on every id listed here
    assert AutoTokenizer.from_pretrained(full).eos_token == "<|im_end|>"
    assert json.loads((full / "config.json").read_text())["eos_token_id"] == im_end
    merged = Path(lora_merged.merged)
    assert im_end in _eos_ids(merged)  # rebuilt from the base, whose generation config stops on <|endoftext|>
    assert AutoTokenizer.from_pretrained(merged).eos_token == "<|im_end|>"

    from selfinstruct.train import end_of_turn

    assert end_of_turn(tok) == "<|im_end|>"
    trainer, resolved, *_ = build_trainer(cfg.model_copy(update={"out": str(tmp_path / "again")}))
    assert (resolved.template, resolved.eos) == ("chat", "<|im_end|>")
    assert im_end in trainer.train_dataset[0]["input_ids"][-2:]  # ... answer <|im_end|> "\n", trained on
    assert 'eos = "<|im_end|>"' in (full / "train_config.toml").read_text()


def test_item2_template_without_a_turn_end_token_trains_with_alpaca(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from selfinstruct.train import TrainConfig, resolve_defaults

    base = TrainConfig(data="d", model="m", out="o")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    plain = resolve_defaults(base, tok, False, False)
    assert plain.template == "alpaca" and plain.eos == "<|im_end|>"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = resolve_defaults(base, tok, False, False)
    assert (chat.template, chat.eos) == ("chat", "<|im_end|>")
    none = resolve_defaults(base, SimpleNamespace(chat_template=None, eos_token="</s>"), False, False)
    assert (none.template, none.eos) == ("alpaca", "</s>")


def test_item9_merged_model_carries_its_training_settings(lora_merged, base_like_model):
    from selfinstruct.evaluate import EvaluateConfig, _default_base, _template

    merged = Path(lora_merged.merged)
    assert (merged / "train_config.toml").is_file()
    assert _default_base(str(merged)) == str(base_like_model)
    cfg = EvaluateConfig(model=str(merged), data="unused")
    assert _template(cfg, str(merged)) == "chat"


# ---------------------------------------------------------------- 3. instances only after classification


def test_item3_instances_wait_for_a_classification(seeds, tmp_path):
    good = PipelineResponder(seed=3)

    def classify_fails(request: dict):
        text = "\n".join(m["content"] for m in request.get("messages", []))
        return Reply(status=404, error="no such route") if '"is_classification"' in text else good(request)

    out = tmp_path / "run"
    with FakeOpenAI(responder=classify_fails) as server:
        # the written label, whose requests fail one by one (logprob scoring stops at its calibration instead)
        cfg = gen_config(seeds, out, server, num_instructions=4, classify_scoring="label")
        assert run_generate(cfg) == 0
    assert lines(out / "classification.jsonl") == [] and lines(out / "instances.jsonl") == []
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["finished"] and summary["stages"]["instances"]["waiting_for_classification"] == 4

    with FakeOpenAI(responder=good) as server:  # the resume classifies, then generates in the right order
        assert run_generate(gen_config(seeds, out, server, num_instructions=4)) == 0
    labels = {r["id"]: r["is_classification"] for r in lines(out / "classification.jsonl")}
    generated = {r["id"]: r["output_first"] for r in lines(out / "instances.jsonl")}
    assert len(labels) == 4 and generated == {i: bool(v) for i, v in labels.items()}
    assert json.loads((out / "summary.json").read_text())["finished"]


# ---------------------------------------------------------------- 4. instance filters in the reference's order


def test_item4_invalid_instances_go_before_the_conflict_check():
    from selfinstruct.pipeline.prepare import clean_instances

    dropped: Counter[str] = Counter()
    kept = clean_instances([Instance("x", "Step 1:"), Instance("x", "Boil water.")], 5, dropped)
    assert kept == [Instance("x", "Boil water.")] and dropped == Counter(ends_with_colon=1)
    dropped.clear()
    conflict = [Instance("x", "a b"), Instance("x", "c d"), Instance("", "e")]
    assert clean_instances(conflict, 5, dropped) == [] and dropped == Counter(conflicting_outputs=3)
    dropped.clear()
    assert clean_instances(conflict, 5, dropped, rules=False) == conflict and not dropped


ALPACA_ANSWER = (  # a base model continuing "4. Instruction:": three tasks the reference Alpaca would keep
    " List the steps for repotting a small houseplant.\n4. Input:\n<noinput>\n4. Output:\nThe steps are:\n###\n"
    "5. Instruction: Repeat the given sentence back word for word.\n5. Input:\nThe cat sat.\n5. Output:\n"
    "The cat sat.\n###\n"
    "6. Instruction: Suggest a title for a short story about a lighthouse keeper.\n6. Input:\n<noinput>\n"
    "6. Output:\nThe Last Light\n###\n"
)


@pytest.mark.parametrize("rules", [True, False])
def test_item4_alpaca_pipeline_instance_rules_are_a_flag(seeds, tmp_path, capsys, rules):
    """The Alpaca pipeline applies the Self-Instruct instance rules (a documented deviation);
    `--no-instance-rules` keeps every task, as the reference Alpaca does."""
    out = tmp_path / "run"
    with FakeOpenAI(responder=lambda request: Reply(text=ALPACA_ANSWER)) as server:
        code, _, err = run_main(
            capsys, "generate", seeds, "--out", out, "--pipeline", "alpaca", "--api", "completions",
            "--model", server.models[0], "--base-url", server.url, "--api-key-env", "", "--num-instructions", 3,
            *([] if rules else ["--no-instance-rules"]),
        )  # fmt: skip
    assert code == 0, err
    outputs = [r["output"] for r in lines(out / "corpus.jsonl")]
    dropped = json.loads((out / "summary.json").read_text())["stages"]["finetune"]["instances_dropped"]
    if rules:
        assert outputs == ["The Last Light"]
        assert dropped == {"ends_with_colon": 1, "input_equals_output": 1}
    else:
        assert outputs == ["The steps are:", "The cat sat.", "The Last Light"] and dropped == {}


# ---------------------------------------------------------------- 5. user text is never rich markup


def test_item5_errors_keep_bracketed_text(tmp_path, capsys):
    bad_key = tmp_path / "run.toml"
    bad_key.write_text("[generate]\nbogus_key = 1\n")
    code, _, err = run_main(capsys, "generate", "--config", bad_key)
    assert code == 2 and f"{bad_key}: unknown key 'bogus_key' in [generate]" in err
    bad_value = tmp_path / "value.toml"
    bad_value.write_text("[teacher]\nconcurrency = 0\n")
    code, _, err = run_main(capsys, "generate", "--config", bad_value)
    assert code == 2 and f"invalid setting teacher.concurrency from {bad_value} [teacher]" in err


def test_item5_progress_and_summary_lines_keep_bracketed_text(seeds, tmp_path, capsys):
    with FakeOpenAI(responder=PipelineResponder(seed=1), models=["team[generate]/model"]) as server:
        code, _, err = run_main(
            capsys, "generate", seeds, "--out", tmp_path / "[run]", "--model", "team[generate]/model",
            "--base-url", server.url, "--api-key-env", "", "--num-instructions", 3, "--stages", "bootstrap",
        )  # fmt: skip
    assert code == 0, err
    assert "with team[generate]/model" in err and f"{tmp_path / '[run]' / 'instructions.jsonl'}" in err
    assert "[bootstrap] kept" in err  # the non-interactive progress line

    (tmp_path / "[data]").mkdir()
    corpus = jsonl(
        tmp_path / "[data]" / "c.jsonl", [{"instruction": "Name the a[b]c part of it.", "output": "x"}]
    )
    code, out, err = run_main(capsys, "filter", corpus, "--out", tmp_path / "f", "--extra-blacklist", "a[b]c")
    assert code == 0, err
    assert "[data]/c.jsonl ->" in out and "blacklisted:a[b]c" in out


def test_item5_other_commands_print_user_text_verbatim(seeds, tmp_path, capsys, monkeypatch):
    """evolve's summary, mix's table and plan's title quote paths and model names: never read as markup."""
    from rich.console import Console

    from selfinstruct.evolve import EvolveConfig, run_evolve
    from selfinstruct.generate import GenerateConfig
    from selfinstruct.plan import PlanConfig, run_plan

    (tmp_path / "[data]").mkdir()
    corpus = jsonl(tmp_path / "[data]" / "c.jsonl", [{"instruction": "Name a colour.", "output": "Blue"}])
    teacher = TeacherConfig(model="team[x]/m", base_url=["http://127.0.0.1:9/v1"], api_key_env="")
    evolve_log = tmp_path / "evolve.txt"
    with evolve_log.open("w") as log:  # no rounds: the summary is printed without a teacher
        cfg = EvolveConfig(input=str(corpus), out=str(tmp_path / "[evolved]"), rounds=0, teacher=teacher)
        assert run_evolve(cfg, console=Console(file=log, width=300)) == 0
    assert f"{tmp_path / '[evolved]' / 'corpus.jsonl'}" in evolve_log.read_text()

    monkeypatch.chdir(tmp_path)  # a short relative path fits the table's cell
    code, out, err = run_main(capsys, "mix", "[data]/c.jsonl:1", "--out", "mixed.jsonl")
    assert code == 0, err
    assert "│ [data]/c.jsonl │" in out

    run_plan(PlanConfig(sample=2), "generate", GenerateConfig(seeds=str(seeds), teacher=teacher))
    assert "with team[x]/m" in capsys.readouterr().out


# ---------------------------------------------------------------- 6. shown instructions are normalised


def test_item6_prompts_show_instructions_as_the_reference_normalises_them(tmp_path):
    tasks = small_seed_tasks()[:8]
    tasks[0]["instruction"] = "Write a haiku about the first snow.\n\nKeep the 5-7-5 syllable pattern."
    tasks[1]["instruction"] = "  Name three things\tthat  float:\n"
    tasks[2]["instruction"] = "Rewrite the sentence in the passive voice:"
    seeds = jsonl(tmp_path / "seeds.jsonl", tasks)
    with FakeOpenAI(responder=PipelineResponder(seed=2)) as server:
        cfg = gen_config(
            seeds, tmp_path / "run", server, teacher={"api": "completions"}, stages=["bootstrap"]
        )
        assert run_generate(cfg) == 0
        prompts = [r.json["prompt"] for r in server.completions() if r.json.get("max_tokens") != 1]
    assert prompts
    for prompt in prompts:
        listed = prompt[prompt.index("\n1. ") + 1 :].split("\n")
        assert len(listed) == 9 and listed[-1] == "9."  # eight one-line items, then the open item
        assert all(re.match(r"\d\. \S", item) and not item.endswith(":") for item in listed[:-1])
        assert "Write a haiku about the first snow. Keep the 5-7-5 syllable pattern." in prompt
        assert "Name three things that float\n" in prompt

    from selfinstruct.corpus import load_seed_tasks
    from selfinstruct.pipeline.alpaca import format_task

    shown = format_task(4, load_seed_tasks(seeds)[2])
    assert shown.startswith("4. Instruction: Rewrite the sentence in the passive voice\n4. Input:\n")


# ---------------------------------------------------------------- 7. labelled few-shot examples


def test_item7_unlabelled_seeds_borrow_the_projects_labelled_examples(tmp_path):
    from selfinstruct.corpus import load_tasks_any

    alpaca = [{"instruction": t["instruction"], **t["instances"][0]} for t in small_seed_tasks()]
    seeds = tmp_path / "alpaca.json"
    seeds.write_text(json.dumps(alpaca))
    assert not any(t.is_classification for t in load_tasks_any(seeds))  # Alpaca records carry no labels

    with FakeOpenAI(responder=PipelineResponder(seed=4)) as server:
        cfg = gen_config(
            seeds, tmp_path / "run", server, stages=["bootstrap", "classify"], num_instructions=3
        )
        assert run_generate(cfg) == 0
        classify = [
            {m["content"] for m in r.json["messages"] if m["role"] == "assistant"}
            for r in server.completions()
            if r.json.get("logprobs")  # the classify stage's (logprob scoring)
        ]
    # the worked examples (assistant turns) answer both ways
    assert classify and all({"Yes", "No"} <= answers for answers in classify)

    from selfinstruct.corpus import load_seed_tasks
    from selfinstruct.pipeline.classify import labelled_seeds
    from selfinstruct.pipeline.instances import few_shot
    from selfinstruct.seeds import PROJECT_SEEDS

    assert PROJECT_SEEDS.is_file() and any(t.is_classification for t in load_seed_tasks(PROJECT_SEEDS))
    output_first = few_shot(labelled_seeds(load_tasks_any(seeds)), True, 0)
    assert len(output_first) >= 3 and all(t.is_classification for t in output_first)


# ---------------------------------------------------------------- 8. finished means the chosen stages


def test_item8_a_finished_subset_of_stages_is_finished(seeds, tmp_path, capsys):
    from rich.console import Console

    out = tmp_path / "run"
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    with FakeOpenAI(responder=PipelineResponder(seed=5)) as server:
        assert run_generate(gen_config(seeds, out, server, stages=["bootstrap"]), console=console) == 0
    console.file.close()
    assert json.loads((out / "summary.json").read_text())["finished"]
    log = (tmp_path / "log.txt").read_text()
    assert "generate finished" in log and "rerun" not in log and "classify" not in log


# ---------------------------------------------------------------- 10. eval split by task


def test_item10_eval_split_never_splits_a_task():
    from selfinstruct.train import split_eval

    records = [
        CorpusRecord(f"Task number {t}.", f"input {k}", f"output {k}", {"task_id": f"t{t}"} if t % 2 else {})
        for t in range(20)
        for k in range(3)
    ]
    train_part, held = split_eval(records, 0.2, seed=1)
    assert len(held) == 12 and len(train_part) == 48
    assert not {r.instruction for r in held} & {r.instruction for r in train_part}
    assert split_eval(records, 0.2, seed=1) == (train_part, held)


# ---------------------------------------------------------------- 11. filter judges each task once


def test_item11_filter_keeps_or_drops_a_tasks_records_together(tmp_path, capsys):
    tasks = [
        ("gen_0", "Write a limerick about a cat who loves boxes.", 3),
        ("gen_1", "Explain how a bicycle gear system works to a child.", 2),
        ("gen_2", "Write a limerick about a cat who loves big boxes.", 2),  # too similar to gen_0
    ]
    rows = [
        {"instruction": text, "input": "", "output": f"answer {k}", "meta": {"task_id": tid}}
        for tid, text, n in tasks
        for k in range(n)
    ]
    corpus = jsonl(tmp_path / "corpus.jsonl", rows)
    code, _, err = run_main(capsys, "filter", corpus, "--out", tmp_path / "f")
    assert code == 0, err
    kept = lines(tmp_path / "f" / "kept.jsonl")
    rejected = lines(tmp_path / "f" / "rejected.jsonl")
    assert [r["meta"]["task_id"] for r in kept] == ["gen_0"] * 3 + ["gen_1"] * 2
    assert [(r["record"]["meta"]["task_id"], r["reason"]) for r in rejected] == [("gen_2", "too_similar")] * 2
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert (summary["records"], summary["tasks"], summary["kept"]) == (7, 3, 5)


# ---------------------------------------------------------------- 12. stats novelty with --seeds, run threshold


def test_item12_stats_scores_every_record_against_given_seeds_and_uses_the_runs_threshold(tmp_path):
    from selfinstruct.report import StatsConfig, stats_report

    seeds = jsonl(tmp_path / "seeds.jsonl", small_seed_tasks())
    corpus = jsonl(tmp_path / "other_seeds.jsonl", small_seed_tasks()[:5])  # seed format: no machine markers
    stats, _ = stats_report(StatsConfig(path=str(corpus), seeds=str(seeds)))
    novelty = stats["rouge_to_seeds"]
    assert novelty["available"] and novelty["scored_instructions"] == 5 and novelty["mean"] == 1.0

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'[generate]\nseeds = "{seeds}"\n\n[filters]\nthreshold = 0.3\n')
    # nearest-seed F: 0.92, 0.375, 0.0 -> two of three above 0.3 (one above the default 0.7)
    texts = [
        "Suggest a name for a dog that loves to sleep in boxes.",
        "Plan a picnic for six friends.",
        "Compose limericks quickly.",
    ]
    jsonl(
        run / "corpus.jsonl",
        [
            {"instruction": t, "input": "", "output": "x", "meta": {"task_id": f"g{k}"}}
            for k, t in enumerate(texts)
        ],
    )
    stats, out = stats_report(StatsConfig(path=str(run)))
    novelty = stats["rouge_to_seeds"]
    assert novelty["threshold"] == 0.3 and novelty["share_above_threshold"] == pytest.approx(2 / 3)
    assert "share above 0.3" in (out / "report.html").read_text()


# ---------------------------------------------------------------- 13. --help defaults


def test_item13_help_shows_no_pydantic_undefined():
    for name in cli.COMMANDS:
        text = cli.build_parser(name)._subparsers._group_actions[0].choices[name].format_help()
        assert "PydanticUndefined" not in text, name


# ---------------------------------------------------------------- acceptance: the reference seed schema end to end

REFERENCE_SCHEMA_SEEDS = Path(__file__).parent / "fixtures" / "reference_schema_seeds.jsonl"
"""Our own tasks in the exact schema and with the quirks of yizhongw/self-instruct's data/seed_tasks.jsonl: ids
`seed_task_N`, a `name`, instructions with line breaks inside and trailing colons, empty inputs, labels."""


def test_reference_schema_seeds_run_through_every_command(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    seeds = REFERENCE_SCHEMA_SEEDS
    raw = lines(seeds)
    assert [set(r) for r in raw] == [{"id", "name", "instruction", "instances", "is_classification"}] * len(
        raw
    )
    assert any("\n" in r["instruction"] for r in raw) and any(r["instruction"].endswith(":") for r in raw)
    run, alpaca = tmp_path / "run", tmp_path / "alpaca"
    with FakeOpenAI(responder=PipelineResponder(seed=11)) as server:
        teacher = ("--model", "fake-model", "--base-url", server.url, "--api-key-env", "", "--concurrency", 4)
        code, _, err = run_main(
            capsys, "generate", seeds, "--out", run, "--num-instructions", 8, "--include-seeds", *teacher
        )
        assert code == 0, err
        code, _, err = run_main(
            capsys, "generate", seeds, "--out", alpaca, "--pipeline", "alpaca", "--api", "completions",
            "--num-instructions", 8, *teacher,
        )  # fmt: skip
        assert code == 0, err
        prompts = [r.json["prompt"] for r in server.completions() if "prompt" in r.json]
    assert json.loads((run / "summary.json").read_text())["finished"]
    assert json.loads((alpaca / "summary.json").read_text())["finished"]
    shown = [ln for p in prompts for ln in p.splitlines() if re.match(r"\d+\. Instruction: \S", ln)]
    assert shown and not any(ln.endswith(":") for ln in shown)
    assert any("Solve the word problem below. Show each step of your reasoning" in ln for ln in shown)

    corpus = lines(run / "corpus.jsonl")
    origins = Counter(r["meta"]["origin"] for r in corpus)
    assert origins["seed"] == len(raw) and origins["machine"] > 8  # several instances per machine task

    code, _, err = run_main(capsys, "filter", run / "corpus.jsonl", "--out", tmp_path / "filtered")
    assert code == 0, err
    kept = lines(tmp_path / "filtered" / "kept.jsonl")
    dropped = {r["record"]["meta"]["task_id"] for r in lines(tmp_path / "filtered" / "rejected.jsonl")}
    assert len(kept) >= origins["machine"] and not dropped & {r["meta"]["task_id"] for r in kept}

    code, _, err = run_main(
        capsys,
        "split",
        tmp_path / "filtered" / "kept.jsonl",
        "--out",
        tmp_path / "split",
        "--holdout-fraction",
        0.3,
    )
    assert code == 0, err
    train_rows, held = lines(tmp_path / "split" / "train.jsonl"), lines(tmp_path / "split" / "heldout.jsonl")
    assert held and not {r["meta"]["task_id"] for r in held} & {r["meta"]["task_id"] for r in train_rows}

    code, _, err = run_main(
        capsys, "train", "--data", tmp_path / "split" / "train.jsonl", "--model", tiny_model_dir,
        "--out", tmp_path / "tuned", "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--eval-fraction", 0.2,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "tuned" / "train_summary.json").read_text())["global_step"] == 2

    code, _, err = run_main(capsys, "stats", run, "--seeds", seeds, "--out", tmp_path / "report")
    assert code == 0, err
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["rouge_to_seeds"]["available"] and stats["counts"]["seed_instructions"] == len(raw)

    # the seed file itself is an input of filter, split, train and stats as well
    code, _, err = run_main(capsys, "filter", seeds, "--out", tmp_path / "seeds-filtered")
    assert code == 0, err
    summary = json.loads((tmp_path / "seeds-filtered" / "summary.json").read_text())
    assert summary["records"] == len(raw) and summary["kept"] + summary["rejected"] == len(raw)
    code, _, err = run_main(
        capsys, "split", seeds, "--out", tmp_path / "seeds-split", "--holdout-fraction", 0.25
    )
    assert code == 0, err
    halves = [lines(tmp_path / "seeds-split" / f"{name}.jsonl") for name in ("train", "heldout")]
    assert all(halves) and sum(map(len, halves)) == len(raw)
    code, _, err = run_main(
        capsys, "train", "--data", seeds, "--model", tiny_model_dir, "--out", tmp_path / "seeds-tuned",
        "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_main(capsys, "stats", seeds, "--seeds", seeds, "--out", tmp_path / "seeds-report")
    assert code == 0, err
    stats = json.loads((tmp_path / "seeds-report" / "stats.json").read_text())
    assert stats["rouge_to_seeds"]["mean"] == 1.0  # every instruction is its own nearest seed
