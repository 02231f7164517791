"""Benchmark `selfinstruct generate` against an OpenAI-compatible server that answers after a fixed latency.

    python benchmarks/bench_generate.py             # latency 200 ms, concurrency 1 vs 32, 50k pool
    python benchmarks/bench_generate.py --quick     # smaller runs

What it measures (bootstrap stage, chat prompts with structured output, the real pipeline end to end: the
`openai` SDK over HTTP, parsing, heuristic + exact ROUGE-L filters, fsynced JSONL journal):
  1. kept instructions/s at concurrency 1 (the reference's sequential loop) and at concurrency 32, their ratio,
     and efficiency = achieved requests/s ÷ ideal requests/s (concurrency / latency);
  2. the same requests sent by the bare teacher (no parsing, filtering or writing): the ceiling this machine's
     CPU, the `openai` SDK and the Python test server allow, to tell the pipeline's overhead from theirs;
  3. CPU time of the generate process per kept instruction with the novelty pool pre-filled with 50k
     instructions (given as seeds, so every candidate is compared against 50k+ texts).
The server runs in its own process so the CPU numbers are the pipeline's alone. Instructions come from the
instruction-shaped random text generator of bench_filter.py (Zipfian vocabulary), so most are novel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from selfinstruct.generate import GenerateConfig, run_generate
from selfinstruct.parsing import instructions_schema
from selfinstruct.prompts import Prompts
from selfinstruct.teachers import Sampling, TeacherConfig, TeacherRequest, make_teacher
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import PipelineResponder

sys.path.insert(0, str(Path(__file__).parent))
from bench_filter import InstructionMaker


def serve(latency: float, conn) -> None:
    """Run the fake teacher until the parent closes the pipe."""
    maker = InstructionMaker(seed=99)
    responder = PipelineResponder(seed=1, instructions=lambda rng: maker.instruction())
    with FakeOpenAI(responder=responder, latency=latency) as server:
        conn.send(server.url)
        conn.recv()


def write_seeds(path: Path, n: int) -> None:
    maker = InstructionMaker(seed=7)
    with open(path, "w") as f:
        for k in range(n):
            task = {
                "id": f"s{k}",
                "instruction": maker.instruction(),
                "instances": [{"input": "", "output": "ok"}],
            }
            f.write(json.dumps(task) + "\n")


def run(url: str, seeds: Path, out: Path, concurrency: int, target: int) -> dict:
    teacher = TeacherConfig(model="fake-model", base_url=[url], api_key_env="", concurrency=concurrency)
    cfg = GenerateConfig(
        seeds=str(seeds), out=str(out), num_instructions=target, stages=["bootstrap"], teacher=teacher
    )
    run_generate(cfg, console=Console(stderr=True, quiet=True))
    summary = json.loads((out / "summary.json").read_text())
    stage = summary["stages"]["bootstrap"]
    elapsed = stage["elapsed_s"]
    return {
        "concurrency": concurrency,
        "kept": stage["done"],
        "requests": stage["requests"],
        "elapsed_s": elapsed,
        "kept_per_s": stage["done"] / elapsed,
        "requests_per_s": stage["requests"] / elapsed,
        "cpu_s": stage["cpu_s"],
        "cpu_ms_per_kept": 1000 * stage["cpu_s"] / max(1, stage["done"]),
        "candidates": stage["candidates"],
    }


def bare_teacher(url: str, concurrency: int, n: int) -> dict:
    """n bootstrap-shaped requests straight through the teacher, `concurrency` in flight."""

    async def go() -> tuple[float, float]:
        teacher = make_teacher(
            TeacherConfig(model="fake-model", base_url=[url], api_key_env="", concurrency=concurrency)
        )
        await teacher.start()
        examples = "\n".join(f"{k}. {InstructionMaker(seed=k).instruction()}" for k in range(1, 9))
        messages, _ = Prompts("chat").get("bootstrap").render(tasks=examples, next=9, count=7)
        sampling = Sampling(temperature=1.0, max_tokens=1024, json_schema=instructions_schema(7))
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(
            *(teacher.generate([TeacherRequest(messages=messages, sampling=sampling)]) for _ in range(n))
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await teacher.close()
        return wall, cpu

    wall, cpu = asyncio.run(go())
    return {"requests_per_s": n / wall, "cpu_ms_per_request": 1000 * cpu / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.2, help="server latency in seconds")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pool", type=int, default=50_000, help="instructions pre-filled into the novelty pool")
    p.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    args = p.parse_args()
    random.seed(0)
    rounds = 10 if args.quick else 25  # windows of `concurrency` requests in the concurrent run

    parent, child = mp.Pipe()
    server = mp.Process(target=serve, args=(args.latency, child), daemon=True)
    server.start()
    url = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            small, big = tmp_path / "seeds-small.jsonl", tmp_path / "seeds-pool.jsonl"
            write_seeds(small, 200)
            write_seeds(big, args.pool)
            probe = run(url, small, tmp_path / "probe", 4, 40)
            per_request = probe["kept"] / probe["requests"]
            seq = run(
                url, small, tmp_path / "seq", 1, max(10, round(per_request * (8 if args.quick else 20)))
            )
            n = args.concurrency
            par = run(url, small, tmp_path / "par", n, round(per_request * n * rounds))
            bare = bare_teacher(url, n, par["requests"])
            pool = run(url, big, tmp_path / "pool", n, round(per_request * n * rounds / 2))
    finally:
        parent.send("stop")
        server.join(timeout=10)

    ideal = args.concurrency / args.latency
    print(f"fake server latency {args.latency * 1000:.0f} ms, chat + structured output, bootstrap stage")
    print(
        f"{'run':<22}{'kept':>7}{'requests':>10}{'elapsed s':>11}{'kept/s':>9}{'req/s':>8}{'CPU ms/kept':>13}"
    )
    for name, r in (
        ("concurrency 1", seq),
        (f"concurrency {args.concurrency}", par),
        (f"{args.concurrency}, pool {args.pool // 1000}k", pool),
    ):
        print(
            f"{name:<22}{r['kept']:>7}{r['requests']:>10}{r['elapsed_s']:>11.2f}{r['kept_per_s']:>9.1f}"
            f"{r['requests_per_s']:>8.1f}{r['cpu_ms_per_kept']:>13.3f}"
        )
    print(
        f"speed-up at concurrency {args.concurrency}: {par['kept_per_s'] / seq['kept_per_s']:.1f}x kept/s (target >= 25x)"
    )
    print(f"efficiency vs ideal {ideal:.0f} req/s: {par['requests_per_s'] / ideal:.1%} (target >= 90%)")
    print(
        f"bare teacher, same requests: {bare['requests_per_s']:.1f} req/s ({bare['requests_per_s'] / ideal:.1%} of "
        f"ideal), {bare['cpu_ms_per_request']:.2f} ms CPU/request; pipeline CPU/request "
        f"{1000 * par['cpu_s'] / par['requests']:.2f} ms; pipeline = {par['requests_per_s'] / bare['requests_per_s']:.1%} of bare"
    )
    print(
        f"sequential efficiency vs ideal {1 / args.latency:.0f} req/s: {seq['requests_per_s'] * args.latency:.1%}"
    )
    print(
        f"CPU per kept instruction at a {args.pool // 1000}k pool: {pool['cpu_ms_per_kept']:.3f} ms "
        f"({pool['candidates']} candidates, {pool['kept']} kept; target <= 2 ms)"
    )


if __name__ == "__main__":
    main()
