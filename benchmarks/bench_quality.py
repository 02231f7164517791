"""Data quality on a real model: run `generate` against a real teacher and measure every stage.

    python benchmarks/bench_quality.py                       # SmolLM2-135M-Instruct, served by vLLM here
    python benchmarks/bench_quality.py --base-url URL --model NAME   # any running OpenAI-compatible server

It starts `python -m vllm.entrypoints.openai.api_server` on the model (default: the built-in
`smollm2-135m-instruct`, converted from its GGUF once) with the server's default flags, then runs, over HTTP,
each pipeline (Self-Instruct with `--num-instructions`, 30; Alpaca with 5 tasks per request) three ways: chat
prompts with structured output, chat prompts answered in free text (the tolerant parser), and raw
list-continuation prompts (`--api completions`, the reference's format and decoding); then the classify stage
on held-out *seed* tasks (few-shot examples come from the other half of the seeds), so its labels can be
compared with the seeds' own `is_classification`: accuracy, precision, recall, balanced accuracy, and the
majority-label baseline. Settings for a small model on a CPU, the same for every run: JSON strings capped at 400
characters, instance answers at 512 tokens, at most `--max-requests` (60) growth requests per run (a style the model
cannot follow would otherwise run for hours on a CPU; the rates are measured on what it answered), Alpaca answers (5 tasks) at 1024, a 10-minute request timeout (a slow CPU is not a failing server).
Per stage it reports the parse-valid rate (answers that yielded at least one readable item), the keep rate and
rejection reasons, placeholder instructions kept ("first task", "...", "task 1"), instances per task, the share
of instances and of tasks that survive the finetune filters, teacher tokens per kept instruction and per corpus
record, and wall time. Everything goes to `benchmarks/results/quality.json`; `--samples` records picked by seed
from the corpora go there too (unedited), for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from selfinstruct.cli import run as cli
from selfinstruct.generate import GenerateConfig, _identity
from selfinstruct.seeds import load_seed_tasks
from selfinstruct.store import read_jsonl

console = Console(highlight=False)
PLACEHOLDER = re.compile(
    r"^\W*((first|second|third|fourth|fifth|new) task|task \d+|\.\.\.|<[^>]*>)\W*$", re.I
)


STYLES = {
    "chat-structured": ["--structured-output"],
    "chat-text": ["--no-structured-output"],
    "completions": ["--api", "completions"],
}


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server with its default scheduling flags (chunked prefill on), as a user would start it."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--gpu-memory-utilization", "0.1", "--max-model-len", "8192"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM server did not start in 10 min; see {log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(out: Path, seeds: Path, teacher: list[str], *extra: str) -> float:
    start = time.monotonic()
    code = cli(["generate", str(seeds), "--out", str(out), *teacher, "--seed", "0", *extra])
    if code != 0:
        raise SystemExit(f"generate failed with exit code {code} for {out}")
    return time.monotonic() - start


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def growth_metrics(run: Path, stage: str) -> dict[str, Any]:
    """Bootstrap/Alpaca: parse-valid answers, keep rate, rejection reasons, placeholders kept."""
    summary = json.loads((run / "summary.json").read_text())
    st = summary["stages"][stage]
    kept = list(read_jsonl(run / "instructions.jsonl"))
    rejected = [r for r in read_jsonl(run / "rejected.jsonl") if r.get("stage") == stage]
    # answers with a piece that could not be read (or was cut off); every other answer parsed
    unreadable = {
        r["meta"].get("prompt_hash") for r in rejected if r["reason"] in ("unparseable", "truncated")
    }
    answers = st["requests"] - st["failed_requests"]
    return {
        "requests": st["requests"],
        "parse_valid_rate": ratio(answers - len(unreadable), answers),
        "candidates": st["candidates"],
        "kept": len(kept),
        "keep_rate": ratio(len(kept), st["candidates"]),
        "rejected_by_reason": st["rejected_by_reason"],
        "placeholders_kept": [r["instruction"] for r in kept if PLACEHOLDER.match(r["instruction"])],
        "wall_s": st["elapsed_s"],
    }


def corpus_metrics(run: Path, self_instruct: bool) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    corpus = list(read_jsonl(run / "corpus.jsonl"))
    tokens = summary["prompt_tokens"] + summary["completion_tokens"]
    out: dict[str, Any] = {
        "corpus_records": len(corpus),
        "teacher_tokens": tokens,
        "tokens_per_kept_instruction": ratio(tokens, summary["kept"]),
        "tokens_per_corpus_record": ratio(tokens, len(corpus)),
        "wall_s": summary["elapsed_s"],
    }
    if self_instruct:
        labels = [r["is_classification"] for r in read_jsonl(run / "classification.jsonl")]
        inst = list(read_jsonl(run / "instances.jsonl"))
        generated = sum(len(r["instances"]) for r in inst)
        with_instances = {r["id"] for r in inst if r["instances"]}
        tasks_in_corpus = {r["meta"].get("task_id") or r["instruction"] for r in corpus}
        st = summary["stages"]
        out.update(
            classify_share_yes=ratio(sum(bool(x) for x in labels), len(labels)),
            classify_unparseable=sum(x is None for x in labels),
            instances_parse_valid_rate=ratio(len(with_instances), len(inst)),
            instances_per_task=ratio(generated, len(inst)),
            instances_passing_finetune=ratio(len(corpus), generated),
            tasks_reaching_instances=len(with_instances),
            tasks_in_corpus=len(tasks_in_corpus),
            tasks_kept_share=ratio(len(tasks_in_corpus), len(with_instances)),
            finetune_drops=st["finetune"].get("instances_dropped", {}),
            wall_s_by_stage={k: v["elapsed_s"] for k, v in st.items()},
        )
    return out


def classify_on_seeds(work: Path, seeds_path: Path, teacher: list[str], extra: list[str]) -> dict[str, Any]:
    """Label half of the seed tasks with the classify stage (few-shot from the other half), against their labels."""
    tasks = load_seed_tasks(seeds_path)
    rng = random.Random(0)
    yes = [t for t in tasks if t.is_classification]
    no = [t for t in tasks if not t.is_classification]
    rng.shuffle(yes)
    rng.shuffle(no)
    shots = yes[: len(yes) // 2] + no[: len(no) // 2]
    held = yes[len(yes) // 2 :] + no[len(no) // 2 :]
    run = work / "classify-seeds"
    if not (run / "state.json").exists():  # a rerun on the same --work only re-reads the results
        run.mkdir(parents=True, exist_ok=True)
        shots_file = work / "classify-shots.jsonl"
        raw = {json.loads(line)["id"]: line for line in seeds_path.read_text().splitlines() if line.strip()}
        shots_file.write_text("".join(raw[t.id] + "\n" for t in shots))
        # the held-out seeds enter the run as if they were kept instructions; the classify stage labels them
        (run / "instructions.jsonl").write_text(
            "".join(json.dumps({"id": t.id, "instruction": t.instruction, "round": 0}) + "\n" for t in held)
        )
        identity = _identity(GenerateConfig(seeds=str(shots_file), out=str(run)))
        state = {"identity": identity, "usage": {}, "elapsed_s": 0.0, "sessions": 0}
        (run / "state.json").write_text(json.dumps(state))
    shots_file = work / "classify-shots.jsonl"
    generate(run, shots_file, teacher, "--stages", "classify", *extra)
    wall = json.loads((run / "summary.json").read_text())["elapsed_s"]
    truth = {t.id: bool(t.is_classification) for t in held}
    pred = {r["id"]: r["is_classification"] for r in read_jsonl(run / "classification.jsonl")}
    tp = sum(1 for i, y in truth.items() if y and pred.get(i))
    fp = sum(1 for i, y in truth.items() if not y and pred.get(i))
    fn = sum(1 for i, y in truth.items() if y and not pred.get(i))
    tn = len(truth) - tp - fp - fn
    recall, specificity = ratio(tp, tp + fn) or 0.0, ratio(tn, tn + fp) or 0.0
    return {
        "n": len(truth),
        "positives": tp + fn,
        "unparseable": sum(1 for i in truth if pred.get(i) is None),
        "accuracy": ratio(tp + tn, len(truth)),
        "precision": ratio(tp, tp + fp),
        "recall": recall,
        "balanced_accuracy": round((recall + specificity) / 2, 3),
        "majority_baseline_accuracy": ratio(max(tp + fn, tn + fp), len(truth)),
        "wall_s": round(wall, 1),
    }


def samples(runs: dict[str, Path], k: int) -> list[dict[str, Any]]:
    records = [
        {"run": name, **{f: r[f] for f in ("instruction", "input", "output")}}
        for name, run in runs.items()
        for r in read_jsonl(run / "corpus.jsonl")
        if r.get("meta", {}).get("origin", "machine") != "seed"
    ]
    return random.Random(0).sample(records, min(k, len(records)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model to serve (name, dir or .gguf)"
    )
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    parser.add_argument("--seeds", default="seeds/seed_tasks.jsonl")
    parser.add_argument("--num-instructions", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument(
        "--max-requests",
        type=int,
        default=60,
        help="cap per run (a style the model cannot follow stops here)",
    )
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument(
        "--work", help="keep the run directories here (default: a temp dir); rerunning on it only re-measures"
    )
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = Path(args.seeds).resolve()
    server = None
    base_url, model = args.base_url, args.model
    if base_url is None:
        from selfinstruct.models import resolve_model

        port = free_port()
        model_dir = resolve_model(args.model)
        console.print(f"starting vLLM server on {model_dir} (log: {work / 'server.log'})")
        server = start_server(model_dir, port, work / "server.log")
        base_url, model = f"http://127.0.0.1:{port}/v1", "teacher"
    teacher = ["--base-url", base_url, "--model", model, "--concurrency", str(args.concurrency), "--timeout", "600",
               "--schema-max-chars", "400", "--instances-max-tokens", "512", "--alpaca-new-tasks", "5", "--alpaca-max-tokens", "1024"]  # fmt: skip
    n = str(args.num_instructions)
    results: dict[str, Any] = {"model": args.model, "num_instructions": args.num_instructions, "runs": {}}
    runs: dict[str, Path] = {}
    t0 = time.monotonic()
    try:
        for pipeline, stage in (("self-instruct", "bootstrap"), ("alpaca", "alpaca")):
            for style, flags in STYLES.items():
                name = f"{pipeline}/{style}"
                run = work / name.replace("/", "-")
                console.rule(name)
                # the cap counts growth requests: Self-Instruct also spends two per kept instruction later
                cap = args.max_requests + (2 * args.num_instructions if pipeline == "self-instruct" else 0)
                generate(run, seeds, teacher, "--pipeline", pipeline, "--num-instructions", n,
                         "--max-requests", str(cap), *flags)  # fmt: skip
                runs[name] = run
                results["runs"][name] = {
                    stage: growth_metrics(run, stage),
                    "corpus": corpus_metrics(run, pipeline == "self-instruct"),
                }
        results["classify_on_seeds"] = {}
        for style in ("chat-structured", "completions"):
            console.rule(f"classify on held-out seed tasks ({style})")
            results["classify_on_seeds"][style] = classify_on_seeds(
                work / style, seeds, teacher, STYLES[style]
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    results["samples"] = samples(runs, args.samples)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["teacher_wall_s"] = round(
        sum(r["corpus"]["wall_s"] for r in results["runs"].values())
        + sum(c["wall_s"] for c in results["classify_on_seeds"].values()),
        1,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    console.print_json(json.dumps({k: v for k, v in results.items() if k != "samples"}))
    console.print(f"wrote {args.out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
