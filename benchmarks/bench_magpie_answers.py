"""Compare answer decodings of `selfinstruct magpie` on the same kept queries, with the small real model.

    python benchmarks/bench_magpie_answers.py --queries RUN            # every candidate below on RUN's queries
    python benchmarks/bench_magpie_answers.py --queries RUN --only greedy,freq0.5 --answer-max-tokens 1024 256

A tiny model answering greedily loops until the token cap, so most of its answers are rejected
(`truncated_answer`, `repetitive_answer`). This runs magpie's answer stage once per candidate decoding, each on
a copy of RUN (a finished or stopped magpie run: its kept queries, without its answers), all against one
in-process vLLM engine (SmolLM2-135M-Instruct on the CPU, as `bench_magpie.py`), and prints per candidate:
answers complete (kept), looping (rejected as repetitive, or cut off while repeating itself), cut off without
looping, the mean words of a kept answer, and the answer stage's time. The copies stay in `--out` for reading
the answers by eye (`answers.jsonl`, `rejected.jsonl` with the head and tail of each rejected answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console

from selfinstruct.filters.heuristics import Repetitive
from selfinstruct.magpie import ANSWERS, MagpieConfig, run_magpie
from selfinstruct.models import resolve_model
from selfinstruct.rundir import INSTRUCTIONS, REJECTED, STATE
from selfinstruct.store import read_jsonl
from selfinstruct.teachers import TeacherConfig, make_teacher

REFERENCE = {"answer_temperature": 0.0, "answer_top_p": 1.0, "answer_frequency_penalty": 0.0}
"""Magpie's reference answer decoding (greedy, no penalty); each candidate changes only what it names."""

CANDIDATES: dict[str, dict[str, float]] = {
    "greedy": {},  # the reference
    "rep1.1": {"answer_repetition_penalty": 1.1},
    "rep1.2": {"answer_repetition_penalty": 1.2},
    "freq0.3": {"answer_frequency_penalty": 0.3},  # magpie's default
    "freq0.5": {"answer_frequency_penalty": 0.5},
    "pres0.5": {"answer_presence_penalty": 0.5},
    "t0.7/p0.9": {"answer_temperature": 0.7, "answer_top_p": 0.9},
    "t0.3/p0.9/rep1.1": {"answer_temperature": 0.3, "answer_top_p": 0.9, "answer_repetition_penalty": 1.1},
    "t0.5/minp0.1/rep1.1": {"answer_temperature": 0.5, "answer_min_p": 0.1, "answer_repetition_penalty": 1.1},
    "t0.7/p0.9/rep1.2": {"answer_temperature": 0.7, "answer_top_p": 0.9, "answer_repetition_penalty": 1.2},
}


def copy_queries(src: Path, dst: Path) -> None:
    """`src`'s kept queries and query-stage rejections, without anything of the answer stages."""
    dst.mkdir(parents=True)
    shutil.copy(src / INSTRUCTIONS, dst / INSTRUCTIONS)
    shutil.copy(src / STATE, dst / STATE)
    kept = [r for r in read_jsonl(src / REJECTED) if r.get("stage") == "query"]
    (dst / REJECTED).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def tally(run: Path) -> dict[str, Any]:
    looping = Repetitive()
    answers = list(read_jsonl(run / ANSWERS))
    kept = [a["output"] for a in answers if a["output"]]
    rejected = [r for r in read_jsonl(run / REJECTED) if r.get("stage") == "answer"]
    cut = [r for r in rejected if r["reason"] == "truncated_answer"]
    cut_looping = sum(1 for r in cut if looping(r["meta"].get("output", "")))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    return {
        "answers": len(answers),
        "kept": len(kept),
        "looping": sum(1 for r in rejected if r["reason"] == "repetitive_answer") + cut_looping,
        "cut": len(cut) - cut_looping,
        "empty": sum(1 for r in rejected if r["reason"] == "empty_answer"),
        "words": statistics.mean(len(k.split()) for k in kept) if kept else 0.0,
        "seconds": summary["stages"]["answer"]["elapsed_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queries", required=True, help="a magpie run directory whose kept queries to answer"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, directory or .gguf")
    parser.add_argument("--answer-max-tokens", type=int, nargs="+", default=[1024], help="one or more caps")
    parser.add_argument(
        "--only", help="comma-separated candidate names (default: all): " + ", ".join(CANDIDATES)
    )
    parser.add_argument("--out", help="where the copies go (default: a fresh temporary directory)")
    args = parser.parse_args()

    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate {unknown[0]}")
    src = Path(args.queries)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_magpie_answers_"))
    model = str(resolve_model(args.model))
    teacher_cfg = TeacherConfig(
        backend="vllm", model=model, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
        max_model_len=2048,
    )  # fmt: skip
    teacher = make_teacher(teacher_cfg)
    asyncio.run(teacher.start())
    rows = []
    try:
        for cap, name in ((cap, name) for cap in args.answer_max_tokens for name in names):
            run = out / f"{name.replace('/', '_')}-{cap}"
            copy_queries(src, run)
            cfg = MagpieConfig(
                out=str(run),
                num_instructions=sum(1 for _ in read_jsonl(run / INSTRUCTIONS)),
                teacher=teacher_cfg,
                answer_max_tokens=cap,
                **{**REFERENCE, **CANDIDATES[name]},
            )
            run_magpie(cfg, teacher=teacher, console=Console(stderr=True, quiet=True))
            rows.append((name, cap, tally(run)))
            print(f"{name:<22} {cap:>5} {json.dumps(rows[-1][2])}", flush=True)
    finally:
        asyncio.run(teacher.close())

    print(f"\nanswer decodings on the {rows[0][2]['answers']} kept queries of {src}:\n")
    print(
        "| setting | cap | kept (complete) | looping | cut off, not looping | empty | mean words | answer stage |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, cap, r in rows:
        print(
            f"| {name} | {cap} | {r['kept']} | {r['looping']} | {r['cut']} | {r['empty']} | {r['words']:.0f} "
            f"| {r['seconds']:.0f} s |"
        )
    print(f"\ncopies in {out}")


if __name__ == "__main__":
    main()
