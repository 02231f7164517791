"""`selfinstruct magpie`: pre-query extraction from real chat templates, the run against the fake OpenAI server
(records, rejections, resume, budgets, steering prompts, refusals) and one run with the real small model."""

from __future__ import annotations

import io
import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from selfinstruct import cli
from selfinstruct.corpus import load_corpus_any
from selfinstruct.errors import InputFileError, UserError
from selfinstruct.export import ExportConfig, run_export
from selfinstruct.magpie import (
    ChatFormat,
    MagpieConfig,
    end_of_turn,
    load_system_prompts,
    load_tokenizer,
    render_pre_query,
    run_magpie,
)
from selfinstruct.report import StatsConfig, stats_report, verb_object
from selfinstruct.store import read_jsonl
from selfinstruct.teachers import TeacherConfig
from selfinstruct.testing import FakeOpenAI, Reply
from selfinstruct.testing.responders import MagpieResponder, SignalOnFirstRequest
from selfinstruct.tinymodel import CHAT_TEMPLATE as CHATML

# Written for these tests in the shape of Llama 3's template: BOS, header-wrapped roles, trimmed content.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _tokenizer(template: str, specials: list[str], bos: str | None, eos: str):
    """A word-level tokenizer built locally (no hub) whose special tokens and chat template are the real ones."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_tokens([AddedToken(t, special=True) for t in specials])
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


def chatml_tokenizer():
    return _tokenizer(CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>")


def test_pre_query_chatml():
    tok = chatml_tokenizer()
    assert render_pre_query(tok) == "<|im_start|>user\n"
    assert render_pre_query(tok, "You are a chemist.") == (
        "<|im_start|>system\nYou are a chemist.<|im_end|>\n<|im_start|>user\n"
    )
    assert end_of_turn(tok) == ["<|im_end|>"]


def test_pre_query_llama3():
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _tokenizer(LLAMA3, specials, "<|begin_of_text|>", "<|end_of_text|>")
    assert render_pre_query(tok) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert render_pre_query(tok, "Be brief.") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert end_of_turn(tok) == ["<|eot_id|>", "<|end_of_text|>"]


def test_no_double_bos_for_tokenizers_that_add_it():
    """Llama 3's tokenizer adds BOS itself: the text sent drops the template's, so the model sees one."""
    from tokenizers.processors import TemplateProcessing

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _tokenizer(LLAMA3, specials, "<|begin_of_text|>", "<|end_of_text|>")
    bos_id = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
    )
    fmt = ChatFormat(tok, "auto")
    assert fmt.pre_query(None) == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert tok(fmt.pre_query(None)).input_ids.count(bos_id) == 1
    assert fmt.answer_prompt(None, "hello").startswith("<|start_header_id|>user")
    assert ChatFormat(chatml_tokenizer(), "auto").pre_query(None) == "<|im_start|>user\n"  # nothing to drop


def test_pre_query_smollm2_keeps_its_default_system_turn(smollm2_dir: Path):
    """SmolLM2's template puts a default system turn in front of every conversation without one; the
    pre-query keeps it (the model was aligned with it there). A steering system prompt replaces it."""
    tok = load_tokenizer(str(smollm2_dir), "--model")
    assert render_pre_query(tok) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert render_pre_query(tok, "You write math puzzles.") == (
        "<|im_start|>system\nYou write math puzzles.<|im_end|>\n<|im_start|>user\n"
    )
    assert end_of_turn(tok)[0] == "<|im_end|>"


# ---------------------------------------------------------------- runs against the fake server


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only directory with the ChatML template (what `--tokenizer` points at for an HTTP teacher)."""
    out = tmp_path_factory.mktemp("chatml")
    chatml_tokenizer().save_pretrained(out)
    return out


def _cfg(
    server: FakeOpenAI, out: Path, tokenizer: Path, concurrency: int | None = None, **kw
) -> MagpieConfig:
    teacher = TeacherConfig(
        model="fake-model",
        base_url=[server.url],
        api="completions",
        api_key_env="",
        max_retries=0,
        concurrency=concurrency,
    )
    return MagpieConfig(out=str(out), tokenizer=str(tokenizer), teacher=teacher, **kw)


def test_run_writes_records_rejections_summary(tmp_path: Path, chatml_dir: Path):
    with FakeOpenAI(MagpieResponder()) as server:
        # one request at a time: answers arrive in request order, so the filter verdicts are reproducible
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=30, concurrency=1)) == 0
        requests = [r.json for r in server.completions("/v1/completions") if r.json["max_tokens"] > 1]
    queries = [r for r in requests if r["prompt"] == "<|im_start|>user\n"]
    answers = [r for r in requests if r["prompt"].endswith("<|im_start|>assistant\n")]
    assert queries and len(queries) + len(answers) == len(requests)
    assert all(r["n"] == 8 and r["temperature"] == 1.0 and r["top_p"] == 1.0 for r in queries)
    assert all("<|im_end|>" in r["stop"] for r in queries)
    kept = list(read_jsonl(tmp_path / "instructions.jsonl"))
    assert len(kept) == 30 and len({k["instruction"] for k in kept}) == 30
    # each kept query was answered once, as the user turn of a freshly rendered conversation
    assert sorted(r["prompt"] for r in answers) == sorted(
        f"<|im_start|>user\n{k['instruction']}<|im_end|>\n<|im_start|>assistant\n" for k in kept
    )
    corpus = list(read_jsonl(tmp_path / "corpus.jsonl"))
    assert [c["instruction"] for c in corpus] == [k["instruction"] for k in kept]
    assert all(c["input"] == "" and c["instruction"] in c["output"] for c in corpus)
    assert all(c["meta"]["source"] == "magpie" and c["meta"]["system_prompt"] is None for c in corpus)
    rejected = list(read_jsonl(tmp_path / "rejected.jsonl"))
    assert rejected and all(r["stage"] == "query" for r in rejected)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kept"] == 30 and summary["corpus_records"] == 30 and summary["finished"]
    assert sum(summary["rejected_by_reason"].values()) == len(rejected)
    assert summary["requests"] == len(requests)
    # `stats` reads the run as is: the root verbs (and their objects) of the kept queries, where drift shows
    stats, _ = stats_report(StatsConfig(path=str(tmp_path), out=str(tmp_path / "r"), parser="heuristic"))
    verbs = stats["verbs"]
    assert verbs["instructions"] == 30 and verbs["with_verb_object"] > 0
    counted = Counter(v for v, _ in (verb_object(c["instruction"]) for c in corpus) if v)
    assert [(v["verb"], v["count"]) for v in verbs["top"]] == counted.most_common(len(verbs["top"]))


def test_filters_truncated_repetitive_and_bad_answers(tmp_path: Path, chatml_dir: Path):
    loop = "tell me a story " * 8
    good = ["Name three rivers that flow through Germany.", "Explain how a bicycle gear works."]

    calls = []

    def responder(request):
        if request["prompt"] == "<|im_start|>user\n":
            calls.append(request)
            if len(calls) == 1:
                return Reply(text=["Write a long essay about"] * request["n"], finish_reason="length")
            return [loop, *good]
        return "" if "rivers" in request["prompt"] else "Gears trade force for speed."

    with FakeOpenAI(responder) as server:
        cfg = _cfg(server, tmp_path, chatml_dir, num_instructions=2, queries_per_request=3)
        assert run_magpie(cfg) == 0
    reasons = {(r["stage"], r["reason"]) for r in read_jsonl(tmp_path / "rejected.jsonl")}
    assert {("query", "truncated"), ("query", "repetitive"), ("answer", "empty_answer")} <= reasons
    corpus = list(read_jsonl(tmp_path / "corpus.jsonl"))
    assert [c["instruction"] for c in corpus] == [good[1]]


def test_cut_off_answer_keeps_its_start_and_end_in_rejected(tmp_path: Path, chatml_dir: Path):
    """rejected.jsonl keeps both ends of a long cut-off answer: the end shows whether it looped."""
    long = "Gears trade force for speed. " + "Then it turns. " * 300 + "LAST WORDS"

    def responder(request):
        if request["prompt"] == "<|im_start|>user\n":
            return ["Explain how a bicycle gear works."]
        return Reply(text=[long], finish_reason="length")

    with FakeOpenAI(responder) as server:
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=1, queries_per_request=1)) == 0
    [rejected] = [r for r in read_jsonl(tmp_path / "rejected.jsonl") if r["stage"] == "answer"]
    assert rejected["reason"] == "truncated_answer"
    saved = rejected["meta"]["output"]
    assert saved.startswith("Gears trade force for speed.") and saved.endswith("LAST WORDS")
    assert len(saved) < 2100 < len(long)


def test_queries_pass_the_heuristics_and_exact_rouge_novelty_of_generate(tmp_path: Path, chatml_dir: Path):
    """The same `[filters]` as generate: a too-short query and a near-copy of a kept one (ROUGE-L F above the
    threshold, not an exact repeat) are rejected with their reason and, for the copy, its nearest kept query."""
    first = "Name three rivers that flow through Germany and the cities on their banks."
    near = "Name three rivers that flow through France and the cities on their banks."
    other = "Explain how a bicycle gear works to a child who is learning to ride."
    batches = iter([[first], ["Why?", near, other]])

    def responder(request):
        if request["prompt"] == "<|im_start|>user\n":
            return next(batches)
        return "An answer."

    with FakeOpenAI(responder) as server:
        cfg = _cfg(server, tmp_path, chatml_dir, num_instructions=2, concurrency=1, queries_per_request=3)
        assert run_magpie(cfg) == 0
    assert [k["instruction"] for k in read_jsonl(tmp_path / "instructions.jsonl")] == [first, other]
    rejected = {r["reason"]: r for r in read_jsonl(tmp_path / "rejected.jsonl")}
    assert set(rejected) == {"too_short", "too_similar"}
    assert rejected["too_similar"]["instruction"] == near
    assert rejected["too_similar"]["nearest"]["instruction"] == first
    assert rejected["too_similar"]["nearest"]["score"] > 0.7


def test_resume_continues_from_the_files(tmp_path: Path, chatml_dir: Path):
    with FakeOpenAI(MagpieResponder()) as server:
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=10, concurrency=1)) == 0
        first = list(read_jsonl(tmp_path / "instructions.jsonl"))
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=20, concurrency=1)) == 0
    kept = list(read_jsonl(tmp_path / "instructions.jsonl"))
    assert kept[:10] == first and len({k["id"] for k in kept}) == 20
    assert len({k["instruction"] for k in kept}) == 20
    answered = [a["id"] for a in read_jsonl(tmp_path / "answers.jsonl")]
    assert sorted(answered) == sorted(k["id"] for k in kept)  # nobody answered twice
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sessions"] == 2 and summary["corpus_records"] == 20


def test_budget_stops_before_answering(tmp_path: Path, chatml_dir: Path):
    with FakeOpenAI(MagpieResponder()) as server:
        cfg = _cfg(server, tmp_path, chatml_dir, num_instructions=500, max_requests=3)
        assert run_magpie(cfg) == 0
        assert len([r for r in server.completions("/v1/completions") if r.json["max_tokens"] > 1]) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_requests" and not summary["finished"]
    assert 0 < summary["kept"] < 500 and summary["corpus_records"] == 0


def test_patience_stops_a_model_that_repeats_itself(tmp_path: Path, chatml_dir: Path):
    same = "Suggest a name for a cat that loves to sleep in cardboard boxes."
    with FakeOpenAI(lambda request: [same] * request.get("n", 1)) as server:
        cfg = _cfg(server, tmp_path, chatml_dir, num_instructions=50, patience=10, concurrency=2)
        assert run_magpie(cfg) == 0
        assert len(server.completions("/v1/completions")) < 20
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["query"]["stopped"] == "no_progress" and summary["kept"] == 1
    assert summary["rejected_by_reason"]["duplicate"] >= 10 and not summary["finished"]


def test_progress_shows_each_stage(tmp_path: Path, chatml_dir: Path):
    """The live display of generate, with magpie's stages (a terminal console, as a user sees it)."""
    console = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    with FakeOpenAI(MagpieResponder()) as server:
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=6), console=console) == 0
    shown = console.export_text()
    assert "query (kept)" in shown and "6/6" in shown and "answer (answered)" in shown
    assert "magpie finished: fake-model" in shown and "corpus        6 records" in shown


def test_system_prompts_steer_queries_and_answers(tmp_path: Path, chatml_dir: Path):
    prompts = ["You ask about cooking.", "You ask about astronomy."]
    (tmp_path / "systems.json").write_text(json.dumps(prompts))
    with FakeOpenAI(MagpieResponder()) as server:
        cfg = _cfg(
            server,
            tmp_path / "run",
            chatml_dir,
            num_instructions=20,
            system_prompt=str(tmp_path / "systems.json"),
        )
        assert run_magpie(cfg) == 0
        requests = [r.json["prompt"] for r in server.completions("/v1/completions")]
    pre = {f"<|im_start|>system\n{p}<|im_end|>\n<|im_start|>user\n" for p in prompts}
    assert {r for r in requests if r.endswith("user\n")} == pre  # both sampled
    for rec in read_jsonl(tmp_path / "run" / "corpus.jsonl"):
        system = rec["meta"]["system_prompt"]
        assert system in prompts
        turn = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{rec['instruction']}<|im_end|>"
        assert any(r.startswith(turn) for r in requests)


def test_system_prompt_file_one_per_line_or_json(tmp_path: Path):
    (tmp_path / "domains.txt").write_text("You ask about cooking.\n\n  You ask about law.  \n")
    assert load_system_prompts(str(tmp_path / "domains.txt")) == [
        "You ask about cooking.",
        "You ask about law.",
    ]
    (tmp_path / "bad.json").write_text('["ok", 3]')
    with pytest.raises(InputFileError, match=r"bad\.json: a JSON file must hold a list of non-empty strings"):
        load_system_prompts(str(tmp_path / "bad.json"))


def test_bad_settings_are_one_line_errors(tmp_path: Path, chatml_dir: Path):
    with FakeOpenAI(MagpieResponder()) as server:
        chat = _cfg(server, tmp_path / "a", chatml_dir)
        chat.teacher.api = "chat"
        with pytest.raises(UserError, match="--api completions"):
            run_magpie(chat)
        (tmp_path / "empty.txt").write_text("\n\n")
        with pytest.raises(InputFileError, match=r"empty\.txt: no system prompts"):
            run_magpie(_cfg(server, tmp_path / "b", chatml_dir, system_prompt=str(tmp_path / "empty.txt")))
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "corpus.jsonl").write_text("")
        with pytest.raises(UserError, match="not a magpie run"):
            run_magpie(_cfg(server, tmp_path / "other", chatml_dir))
        assert all(r.json["max_tokens"] == 1 for r in server.completions())  # only start-up probes
    assert not (tmp_path / "a").exists()


def _cli(server: FakeOpenAI, out: Path, tokenizer: Path, *flags: str) -> int:
    args = [
        "magpie",
        "--out",
        str(out),
        "--api",
        "completions",
        "--base-url",
        server.url,
        "--model",
        "fake-model",
    ]
    args += ["--api-key-env", "", "--max-retries", "0", "--tokenizer", str(tokenizer), *flags]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    return exc.value.code


def test_cli_explicit_pre_query_is_sent_as_typed(tmp_path: Path, chatml_dir: Path):
    """`--pre-query TEXT` replaces the rendered template (`\\n` typed on the command line is a newline)."""
    typed = r"<|im_start|>system\nAsk about tea.<|im_end|>\n<|im_start|>user\n"
    with FakeOpenAI(MagpieResponder()) as server:
        code = _cli(server, tmp_path, chatml_dir, "--num-instructions", "5", "--pre-query", typed)
        prompts = [
            r.json["prompt"] for r in server.completions("/v1/completions") if r.json["max_tokens"] > 1
        ]
    assert code == 0
    wanted = "<|im_start|>system\nAsk about tea.<|im_end|>\n<|im_start|>user\n"
    queries = [p for p in prompts if p.endswith("user\n")]
    assert queries and set(queries) == {wanted}
    assert len(list(read_jsonl(tmp_path / "corpus.jsonl"))) == 5


def test_answers_default_to_a_frequency_penalty_and_flags_override_it(tmp_path: Path, chatml_dir: Path):
    """Answers are greedy with frequency penalty 0.3 (a small model's greedy answers loop otherwise); every
    `--answer-*` flag reaches the answer requests, and `--answer-frequency-penalty 0` is the reference's."""

    def sent(out: Path, *flags: str) -> tuple[list[dict], list[dict]]:
        with FakeOpenAI(MagpieResponder()) as server:
            assert _cli(server, out, chatml_dir, "--num-instructions", "3", *flags) == 0
            requests = [r.json for r in server.completions("/v1/completions") if r.json["max_tokens"] > 1]
        answers = [r for r in requests if r["prompt"].endswith("<|im_start|>assistant\n")]
        return [r for r in requests if r not in answers], answers

    queries, answers = sent(tmp_path / "default")
    assert len(answers) == 3 and all(a["frequency_penalty"] == 0.3 for a in answers)
    assert all(a["temperature"] == 0.0 and a["top_p"] == 1.0 and a["max_tokens"] == 1024 for a in answers)
    assert all(not {"presence_penalty", "repetition_penalty", "min_p"} & set(a) for a in answers)
    assert queries and all("frequency_penalty" not in q for q in queries)  # queries keep the reference's

    flags = ["--answer-temperature", "0.5", "--answer-top-p", "0.9", "--answer-frequency-penalty", "0.1"]
    flags += [
        "--answer-presence-penalty",
        "0.2",
        "--answer-repetition-penalty",
        "1.3",
        "--answer-min-p",
        "0.05",
    ]
    _, answers = sent(tmp_path / "flags", *flags)
    keys = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_p")
    assert len(answers) == 3
    assert all(tuple(a[k] for k in keys) == (0.5, 0.9, 0.1, 0.2, 1.3, 0.05) for a in answers)
    _, answers = sent(tmp_path / "reference", "--answer-frequency-penalty", "0")
    assert len(answers) == 3 and all("frequency_penalty" not in a for a in answers)


def test_cli_refuses_chat_endpoints_with_one_line_exit_2(tmp_path: Path, chatml_dir: Path, capsys):
    """`--api chat` is refused before anything starts; an endpoint that serves chat only (404 on
    /v1/completions, as OpenAI answers for a chat model) is refused at start-up, naming the cause."""

    def chat_only(request):
        if "prompt" in request:
            return Reply(
                status=404, error="This is a chat model and not supported in the v1/completions endpoint."
            )
        return "OK"

    with FakeOpenAI(chat_only) as server:
        assert _cli(server, tmp_path / "a", chatml_dir, "--api", "chat") == 2
        assert "use --api completions" in capsys.readouterr().err
        assert _cli(server, tmp_path / "b", chatml_dir, "--turns", "2", "--pre-query", "User: ") == 2
        assert "--turns > 1 needs --pre-query auto" in capsys.readouterr().err
        assert _cli(server, tmp_path / "c", chatml_dir) == 2
        err = capsys.readouterr().err
        assert not server.completions("/v1/chat/completions")
    assert "a chat-only endpoint has no /completions" in err and "This is a chat model" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- the real small model


def test_real_model_writes_kept_instructions(tmp_path: Path, smollm2_dir: Path):
    """SmolLM2-135M-Instruct in the in-process vLLM engine writes its own queries and answers them."""
    from selfinstruct.testing import tiny_vllm_config

    teacher = tiny_vllm_config(smollm2_dir, engine_args={})
    cfg = MagpieConfig(
        out=str(tmp_path), num_instructions=20, answer_max_tokens=128, query_max_tokens=96, teacher=teacher
    )
    assert run_magpie(cfg) == 0
    kept = list(read_jsonl(tmp_path / "instructions.jsonl"))
    assert len(kept) == 20 and len({k["instruction"] for k in kept}) == 20
    assert all(len(k["instruction"].split()) >= 4 for k in kept)
    answers = list(read_jsonl(tmp_path / "answers.jsonl"))
    assert len(answers) == 20
    corpus = list(read_jsonl(tmp_path / "corpus.jsonl"))
    assert corpus and all(c["output"].strip() and c["meta"]["source"] == "magpie" for c in corpus)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] and summary["kept"] == 20


def test_turns_continue_each_conversation(tmp_path: Path, chatml_dir: Path):
    """With --turns 3 every answered query gets two more exchanges; the next user message is sampled from the
    conversation so far rendered up to the next user turn. A rerun with nothing left to do sends nothing."""
    with FakeOpenAI(MagpieResponder()) as server:
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=4, turns=3, concurrency=2)) == 0
        prompts = [
            r.json["prompt"] for r in server.completions("/v1/completions") if r.json["max_tokens"] > 1
        ]
        corpus = list(read_jsonl(tmp_path / "corpus.jsonl"))
        assert len(corpus) == 4
        kept = {k["id"]: k["instruction"] for k in read_jsonl(tmp_path / "instructions.jsonl")}
        for rec in corpus:  # chat records, as converse writes them: every exchange in `messages`
            conv = rec["messages"]
            assert set(rec) == {"messages", "meta"} and "conversation" not in rec["meta"]
            assert [m["role"] for m in conv] == ["user", "assistant"] * 3 and rec["meta"]["turns"] == 3
            assert conv[0] == {"role": "user", "content": kept[rec["meta"]["task_id"]]}
            history = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv[:4])
            assert history + "<|im_start|>user\n" in prompts  # the third query's prompt
            assert (
                history + f"<|im_start|>user\n{conv[4]['content']}<|im_end|>\n<|im_start|>assistant\n"
                in prompts
            )
        assert len(list(read_jsonl(tmp_path / "turns.jsonl"))) == 4 * 4
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["finished"] and summary["stages"]["followup"]["done"] == 8
        before = len(server.completions())
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=4, turns=3)) == 0
        assert all(r.json["max_tokens"] == 1 for r in server.completions()[before:])
    # export, train and stats read every turn, not only the first exchange
    assert (
        run_export(ExportConfig(source=str(tmp_path), format="messages", out=str(tmp_path / "x.jsonl"))) == 0
    )
    exported = list(read_jsonl(tmp_path / "x.jsonl"))
    assert [row["messages"] for row in exported] == [rec["messages"] for rec in corpus]
    assert [r.turns for r in load_corpus_any(tmp_path / "corpus.jsonl")] == [3] * 4
    stats, _ = stats_report(StatsConfig(path=str(tmp_path), out=str(tmp_path / "r"), parser="heuristic"))
    assert stats["conversations"]["multi_turn"] == 4
    assert stats["conversations"]["user_turn"]["count"] == 12


def test_sigterm_stops_magpie_gently_with_exit_143(tmp_path: Path, chatml_dir: Path):
    with FakeOpenAI(SignalOnFirstRequest(MagpieResponder(), signal.SIGTERM)) as server:
        assert run_magpie(_cfg(server, tmp_path, chatml_dir, num_instructions=10)) == 143
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and not summary["finished"]
