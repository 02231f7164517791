"""`make demo`: the whole loop on this machine, offline, in a few minutes.

It runs the same `selfinstruct` commands a user would type (each printed before it runs), so the demo doubles
as a worked example: split the seeds into train/held-out by category, generate a corpus with an in-process vLLM
teacher using structured output, re-filter it, export it, LoRA-tune a student on it, evaluate base vs tuned on
the held-out seed tasks, and write the statistics report.

The model is `SELFINSTRUCT_DEMO_MODEL` (default: a small instruct model from the Hugging Face hub). When it cannot
be loaded, as on a machine without internet, the demo says so and builds a tiny Llama locally instead, first
teaching it the seed tasks for a few seconds so that it writes seed-like text; its corpus is then nonsense, but
every stage runs on it for real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from selfinstruct.seeds import load_seed_tasks, seed_corpus

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HELDOUT_CATEGORIES = ["translation", "summarization"]
console = Console(highlight=False)


def _download(model_id: str, seconds: float) -> str | None:
    """Fetch a hub model, giving up after `seconds` (offline, the hub client fails at once; never hang)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    result: list[str | None] = [None]

    def fetch() -> None:
        try:
            from huggingface_hub import snapshot_download

            result[0] = snapshot_download(
                model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        except Exception as e:  # any failure means: no model, use the tiny one
            console.print(f"[dim]could not load {model_id}: {type(e).__name__}: {str(e).splitlines()[0]}[/]")

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0]


def _run(step: str, args: list[str], log: Path) -> None:
    """Run one `selfinstruct` command, echoing it; its own output goes to the terminal and a log file."""
    console.rule(f"[bold]{step}")
    console.print("$ selfinstruct " + " ".join(args), style="cyan")
    start = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ selfinstruct {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "selfinstruct.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        f.write(proc.stdout)
    tail = "\n".join(proc.stdout.rstrip().splitlines()[-25:])
    console.print(tail, markup=False)
    if proc.returncode != 0:
        console.print(f"[red]step failed ({proc.returncode}); full log: {log}[/]")
        raise SystemExit(proc.returncode)
    console.print(f"[green]done in {time.monotonic() - start:.0f} s[/]")


def _tiny_teacher(work: Path, seeds: Path, log: Path) -> Path:
    """A tiny Llama whose tokenizer and weights have seen the seed tasks, so it writes seed-like text."""
    from selfinstruct.tinymodel import build_tiny_model

    tasks = load_seed_tasks(seeds)
    texts = [t for task in tasks for i in task.instances for t in (task.instruction, i.input, i.output) if t]
    build_tiny_model(work / "tiny-init", texts, vocab_size=2048)
    _run(
        "Teach the tiny teacher the seed tasks (full fine-tune, under a minute)",
        ["train", "--data", str(work / "seeds-corpus.jsonl"), "--model", str(work / "tiny-init"), "--out", str(work / "tiny-teacher"),
         "--epochs", "8", "--learning-rate", "3e-3", "--batch-size", "16", "--grad-accum", "1", "--max-length", "256",
         "--logging-steps", "20", "--save-steps", "100000"],
        log,
    )  # fmt: skip
    return work / "tiny-teacher"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfinstruct.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="demo directory (default: outputs/demo-<time>)")
    parser.add_argument("--seeds", default="seeds/seed_tasks.jsonl")
    parser.add_argument("--num-instructions", type=int, default=20)
    parser.add_argument(
        "--max-requests", type=int, default=400, help="budget cap, a safety net for slow machines"
    )
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    work = Path(args.out or f"outputs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True, exist_ok=False)
    log = work / "demo.log"
    seeds = Path(args.seeds).resolve()
    records = seed_corpus(load_seed_tasks(seeds))
    (work / "seeds-corpus.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    console.print(f"[bold]selfinstruct demo[/] -> {work}")

    model_id = os.environ.get("SELFINSTRUCT_DEMO_MODEL", DEFAULT_MODEL)
    model = model_id if Path(model_id).is_dir() else _download(model_id, seconds=60)
    tiny = model is None
    if tiny:
        console.print(
            f"[yellow]{model_id} could not be loaded (no internet?). Using a tiny model built locally instead: every "
            "stage runs for real, but the text it writes is nonsense. Set SELFINSTRUCT_DEMO_MODEL to a local model "
            "directory or run with internet access for a real corpus.[/]"
        )
        model = str(_tiny_teacher(work, seeds, log))
    engine = [
        "--teacher",
        "vllm",
        "--gpu-memory-utilization",
        "0.1" if tiny else "0.5",
        "--max-model-len",
        "2048",
    ]
    if not _has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        engine += ["--enforce-eager", "--teacher-dtype", "float32"]
    tiny_json: list[str] = []
    if tiny:  # a weak model fills JSON with whitespace and endless strings: forbid the one, cap the other
        engine += [
            "--engine-args",
            '{"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": true}}',
        ]
        # greedy decoding (the reference's instance setting) makes it repeat one phrase: input == output
        tiny_json = ["--schema-max-chars", "300", "--instances-temperature", "1.0"]

    split, run = work / "split", work / "run"
    _run("Split the seed tasks: held-out categories stay unseen",
         ["split", str(work / "seeds-corpus.jsonl"), "--out", str(split), "--holdout-categories", ",".join(HELDOUT_CATEGORIES),
          "--holdout-fraction", "0.1"], log)  # fmt: skip
    _run("Generate a corpus (Self-Instruct pipeline, in-process vLLM teacher, structured output)",
         ["generate", str(split / "train.jsonl"), "--out", str(run), "--model", str(model), *engine, "--structured-output",
          "--num-instructions", str(args.num_instructions), "--max-requests", str(args.max_requests), "--include-seeds",
          "--seed", "0", *tiny_json], log)  # fmt: skip
    _run("Re-filter the corpus against the seeds (the `filter` command on any corpus)",
         ["filter", str(run / "corpus.jsonl"), "--pool", str(seeds), "--out", str(work / "filtered")], log)  # fmt: skip
    _run("Export for TRL (chat prompt/completion) with a dataset card",
         ["export", str(run), "--format", "messages"], log)  # fmt: skip
    _run("LoRA-tune the student on the corpus",
         ["train", "--data", str(run), "--model", str(model), "--out", str(work / "tuned"), "--lora", "--merge",
          "--max-steps", str(args.train_steps), "--batch-size", "8", "--grad-accum", "1", "--learning-rate", "1e-3",
          "--max-length", "512", "--logging-steps", "10"], log)  # fmt: skip
    _run("Evaluate base vs tuned on the held-out seed tasks",
         ["evaluate", "--model", str(work / "tuned"), "--base", str(model), "--data", str(split / "heldout.jsonl"),
          "--train-data", str(split / "train.jsonl"), "--out", str(work / "eval"), "--max-tokens", "64",
          *[a for a in engine if a != "--teacher" and a != "vllm"]], log)  # fmt: skip
    _run("Corpus statistics and the HTML report",
         ["stats", str(run), "--seeds", str(seeds), "--out", str(work / "report")], log)  # fmt: skip
    screenshot = _screenshot(work / "report" / "report.html")

    table = Table(title=f"selfinstruct demo finished in {time.monotonic() - t0:.0f} s", show_lines=False)
    table.add_column("what")
    table.add_column("where")
    for what, where in [
        ("teacher / student model", model + ("  (tiny local model)" if tiny else "")),
        ("kept instructions + provenance", run / "instructions.jsonl"),
        ("rejected candidates + reasons", run / "rejected.jsonl"),
        ("training corpus (Alpaca fields)", run / "corpus.jsonl"),
        ("run summary / resolved config", f"{run / 'summary.json'}  {run / 'config.toml'}"),
        ("re-filtered corpus", work / "filtered" / "kept.jsonl"),
        ("TRL export + dataset card", run / "export"),
        ("LoRA adapter + merged model", work / "tuned"),
        ("evaluation (base vs tuned)", work / "eval" / "eval.md"),
        ("statistics report", work / "report" / "report.html"),
        ("report screenshot", screenshot or "chromium not installed: skipped"),
        ("full log of every command", log),
    ]:
        table.add_row(what, str(where))
    console.print(table)
    console.print((work / "eval" / "eval.md").read_text(), markup=False)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _screenshot(html: Path) -> Path | None:
    """Render the report in headless Chromium when it is installed (the README's screenshot comes from here)."""
    if shutil.which("chromium") is None:
        return None
    png = html.with_suffix(".png")
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "check_report_render.py"), str(html), "--png", str(png)],
        check=False, capture_output=True, timeout=120,
    )  # fmt: skip
    return png if png.exists() else None


if __name__ == "__main__":
    sys.exit(main())
