"""Data quality on a real model: run `generate` against a real teacher and measure every stage.

    python benchmarks/bench_quality.py                       # SmolLM2-135M-Instruct, served by vLLM here
    python benchmarks/bench_quality.py --base-url URL --model NAME   # any running OpenAI-compatible server

It starts `python -m vllm.entrypoints.openai.api_server` on the model (default: the built-in
`smollm2-135m-instruct`, converted from its GGUF once) with the server's default flags, then runs, over HTTP,
each pipeline (Self-Instruct with `--num-instructions`, 30; Alpaca with 5 tasks per request) three ways: chat
prompts with structured output, chat prompts answered in free text (the tolerant parser), and raw
list-continuation prompts (`--api completions`, the reference's format and decoding); then the classify stage
on all the *seed* tasks in two folds (each half labelled with few-shot examples from the other half), so its
labels can be compared with the seeds' own `is_classification`: accuracy, precision, recall, balanced accuracy,
Cohen's kappa (a constant answer scores 0.5 and 0.0) and, for logprob scoring, ROC AUC; for the written label
(chat + structured output, raw prompts) and for logprob scoring with and without contextual calibration (chat
and raw prompts). `--only-classify` measures just that part and keeps the other figures of `--out`. Settings for a small model on a CPU, the same for every run: JSON strings capped at 400
characters, instance answers at 512 tokens, at most `--max-requests` (60) growth requests per run (a style the model
cannot follow would otherwise run for hours on a CPU; the rates are measured on what it answered), Alpaca answers (5 tasks) at 1024, a 10-minute request timeout (a slow CPU is not a failing server).
Per stage it reports the parse-valid rate (answers without an unreadable or cut-off piece), the keep rate and
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
from rich.table import Table

from selfinstruct.cli import run as cli
from selfinstruct.corpus import load_seed_tasks
from selfinstruct.generate import GenerateConfig, _identity
from selfinstruct.store import read_jsonl

console = Console(highlight=False)
PLACEHOLDER = re.compile(
    r"^\W*((first|second|third|fourth|fifth|new) task|task \d+|\.\.\.|<[^>]*>)\W*$", re.I
)


PIPELINES = {"self-instruct": "bootstrap", "alpaca": "alpaca"}
"""Each pipeline run by the benchmark and its growth stage."""

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


def ended(run: Path) -> bool:
    """Whether a run in --work finished or stopped at its cap (not interrupted), so its summary is the measure."""
    path = run / "summary.json"
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    return summary["finished"] or summary["stop_reason"] not in (None, "interrupted")


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


CLASSIFY_VARIANTS = {
    "label/chat-structured": ["--structured-output", "--classify-scoring", "label"],
    "label/completions": ["--api", "completions", "--classify-scoring", "label"],
    "logprob-calibrated/chat": ["--classify-scoring", "logprob", "--classify-calibrate"],
    "logprob-calibrated/completions": ["--api", "completions", "--classify-scoring", "logprob", "--classify-calibrate"],
}  # fmt: skip
"""Runs of the classify stage on the seeds. The uncalibrated logprob decisions come from the same answers: each
record's score plus the run's calibration offset is the raw score (greedy 1-token requests, so asking again
would give the same numbers)."""


def agreement(pred: list[bool], truth: list[bool], scores: list[float] | None = None) -> dict[str, Any]:
    """Accuracy, precision, recall, balanced accuracy, Cohen's kappa (a constant answer: 0.5 and 0.0), ROC AUC."""
    n = len(truth)
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    fp = sum(p and not t for p, t in zip(pred, truth, strict=True))
    fn = sum(t and not p for p, t in zip(pred, truth, strict=True))
    tn = n - tp - fp - fn
    accuracy = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
    out = {
        "predicted_yes": tp + fp,
        "accuracy": round(accuracy, 3),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "balanced_accuracy": round(((ratio(tp, tp + fn) or 0.0) + (ratio(tn, tn + fp) or 0.0)) / 2, 3),
        "kappa": round((accuracy - chance) / (1 - chance), 3) if chance < 1 else 0.0,
    }
    if scores is not None:  # threshold-free: how well the score ranks classification tasks first
        pos = [s for s, t in zip(scores, truth, strict=True) if t]
        neg = [s for s, t in zip(scores, truth, strict=True) if not t]
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        out["roc_auc"] = round(wins / (len(pos) * len(neg)), 3)
    return out


def classify_on_seeds(work: Path, seeds_path: Path, teacher: list[str]) -> dict[str, Any]:
    """Label every seed task with the classify stage, in two folds (each half labelled with few-shot examples
    from the other half), and compare with the seeds' own `is_classification`."""
    tasks = load_seed_tasks(seeds_path)
    rng = random.Random(0)
    yes = [t for t in tasks if t.is_classification]
    no = [t for t in tasks if not t.is_classification]
    rng.shuffle(yes)
    rng.shuffle(no)
    folds = [yes[: len(yes) // 2] + no[: len(no) // 2], yes[len(yes) // 2 :] + no[len(no) // 2 :]]
    raw = {json.loads(line)["id"]: line for line in seeds_path.read_text().splitlines() if line.strip()}
    truth = {t.id: bool(t.is_classification) for t in tasks}
    results: dict[str, Any] = {"n": len(tasks), "positives": sum(truth.values())}
    results["constant_answer"] = {
        "all_no_accuracy": ratio(len(tasks) - results["positives"], len(tasks)),
        "balanced_accuracy": 0.5,
        "kappa": 0.0,
    }
    for name, flags in CLASSIFY_VARIANTS.items():
        console.rule(f"classify on the seed tasks: {name}")
        records: dict[str, dict[str, Any]] = {}
        offsets: dict[str, float] = {}
        wall = 0.0
        for k, held in enumerate(folds):
            run = work / name.replace("/", "-") / f"fold{k}"
            shots_file = run.parent / f"shots{k}.jsonl"
            if not (run / "state.json").exists():  # a rerun on the same --work only re-reads the results
                run.mkdir(parents=True, exist_ok=True)
                shots_file.write_text("".join(raw[t.id] + "\n" for t in folds[1 - k]))
                # the held-out seeds enter the run as if they were kept instructions; the classify stage labels them
                (run / "instructions.jsonl").write_text(
                    "".join(
                        json.dumps({"id": t.id, "instruction": t.instruction, "round": 0}) + "\n"
                        for t in held
                    )
                )
                identity = _identity(GenerateConfig(seeds=str(shots_file), out=str(run)))
                state = {"identity": identity, "usage": {}, "elapsed_s": 0.0, "sessions": 0}
                (run / "state.json").write_text(json.dumps(state))
            generate(run, shots_file, teacher, "--stages", "classify", *flags)
            summary = json.loads((run / "summary.json").read_text())
            wall += summary["elapsed_s"]
            calibration = summary["stages"]["classify"].get("calibration")
            for r in read_jsonl(run / "classification.jsonl"):
                records[r["id"]] = r
                if calibration and calibration.get("applied", True):
                    offsets[r["id"]] = calibration["offset"]
        ids = sorted(truth)
        gold = [truth[i] for i in ids]
        if name.startswith("logprob"):
            calibrated = [records[i]["score"] for i in ids]
            uncalibrated = [records[i]["score"] + offsets[i] for i in ids]
            style = name.split("/")[1]
            results[f"logprob/{style}"] = {
                **agreement([x > 0 for x in uncalibrated], gold, uncalibrated),
                "wall_s": round(wall, 1),
            }
            results[name] = {
                **agreement([x > 0 for x in calibrated], gold, calibrated),
                "calibration_offsets": sorted(set(offsets.values())),
                "wall_s": round(wall, 1),
            }
        else:
            labels = [records[i]["is_classification"] for i in ids]
            results[name] = {
                **agreement([bool(x) for x in labels], gold),
                "unparseable": sum(x is None for x in labels),
                "wall_s": round(wall, 1),
            }
    return results


def print_classify(results: dict[str, Any]) -> None:
    table = Table(title=f"classify on {results['n']} seed tasks ({results['positives']} classification)")
    columns = ("accuracy", "precision", "recall", "balanced_accuracy", "kappa", "roc_auc", "predicted_yes")
    table.add_column("variant")
    for c in columns:
        table.add_column(c.replace("_", " "), justify="right")
    for name, r in results.items():
        if isinstance(r, dict) and "accuracy" in r:
            table.add_row(name, *("–" if r.get(c) is None else str(r[c]) for c in columns))
    c = results["constant_answer"]
    table.add_row("constant answer", str(c["all_no_accuracy"]), "–", "–", "0.5", "0.0", "0.5", "–")
    Console(highlight=False, width=150).print(table)


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
    parser.add_argument(
        "--only-classify",
        action="store_true",
        help="measure only the classify stage on the seeds; the other figures in --out are kept",
    )
    parser.add_argument(
        "--pipelines",
        type=lambda v: v.split(","),
        default=list(PIPELINES),
        help=f"comma-separated subset of {','.join(PIPELINES)}; a subset re-measures only those runs (no classify "
        "on the seeds) and keeps the other figures of --out",
    )
    parser.add_argument(
        "--styles",
        type=lambda v: v.split(","),
        default=list(STYLES),
        help=f"comma-separated subset of {','.join(STYLES)}; a subset works like --pipelines",
    )
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument(
        "--work", help="keep the run directories here (default: a temp dir); rerunning on it only re-measures"
    )
    args = parser.parse_args()
    for flag, chosen, known in (
        ("--pipelines", args.pipelines, PIPELINES),
        ("--styles", args.styles, STYLES),
    ):
        if unknown := [v for v in chosen if v not in known]:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    selected = [] if args.only_classify else [(p, s) for p in PIPELINES if p in args.pipelines for s in STYLES if s in args.styles]  # fmt: skip
    full = len(selected) == len(PIPELINES) * len(STYLES)
    measure_classify = full or args.only_classify
    if not full and not Path(args.out).exists():
        parser.error(f"{args.out}: not found; a partial run keeps the other figures of this file")

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
    if not full:
        results = json.loads(Path(args.out).read_text())
    runs: dict[str, Path] = {}
    t0 = time.monotonic()
    try:
        for pipeline, style in selected:
            stage = PIPELINES[pipeline]
            name = f"{pipeline}/{style}"
            run = work / name.replace("/", "-")
            console.rule(name)
            if not ended(run):  # an ended run is only re-measured: resuming it would report an empty session
                # the cap counts growth requests: Self-Instruct also spends two per kept instruction later
                cap = args.max_requests + (2 * args.num_instructions if pipeline == "self-instruct" else 0)
                generate(run, seeds, teacher, "--pipeline", pipeline, "--num-instructions", n,
                         "--max-requests", str(cap), *STYLES[style])  # fmt: skip
            runs[name] = run
            results["runs"][name] = {
                stage: growth_metrics(run, stage),
                "corpus": corpus_metrics(run, pipeline == "self-instruct"),
            }
        if measure_classify:
            results["classify_on_seeds"] = classify_on_seeds(work / "classify", seeds, teacher)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    classify = results["classify_on_seeds"]
    classify["wall_s"] = round(sum(classify[name]["wall_s"] for name in CLASSIFY_VARIANTS), 1)
    if runs:
        # a partial run replaces only the samples drawn from the runs it measured
        kept = [r for r in results.get("samples", []) if r["run"] not in runs]
        results["samples"] = kept + samples(runs, max(0, args.samples - len(kept)))
        results["teacher_wall_s"] = round(
            sum(r["corpus"]["wall_s"] for r in results["runs"].values()) + classify["wall_s"], 1
        )
    if full:
        results["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    console.print_json(json.dumps({k: v for k, v in results.items() if k != "samples"}))
    if measure_classify:
        print_classify(classify)
    console.print(f"wrote {args.out} ({round(time.monotonic() - t0, 1)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
