"""Benchmark `selfinstruct evolve` against an OpenAI-compatible server that answers after a fixed latency.

    python benchmarks/bench_evolve.py             # 200 records, 3 rounds, latency 200 ms, concurrency 32
    python benchmarks/bench_evolve.py --quick     # 60 records

What it measures (chat prompts with structured output, the real command end to end: the `openai` SDK over HTTP,
rewrite → equality judge → answer per record and round, parsing, eliminations, heuristic + exact ROUGE-L filters,
fsynced JSONL journal):
  1. requests/s and efficiency = achieved requests/s ÷ ideal requests/s (concurrency / latency), plus the
     server's count of requests in flight at once (the pipeline should keep `--concurrency` of them busy);
  2. the same number of requests sent by the bare teacher (no parsing, filtering or writing): the ceiling this
     machine's CPU, the `openai` SDK and the Python test server allow, to tell the pipeline's overhead from theirs;
  3. CPU time of the evolve process per record-round (one evolution: up to 3 requests) and per request, and the
     part of it that is ours (minus the bare teacher's CPU for the same requests).
The server runs in its own process so the CPU numbers are the client's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from selfinstruct.evolve import EvolveConfig, Evolver, evolved_schema, format_task, run_evolve
from selfinstruct.prompts import Prompts
from selfinstruct.teachers import Sampling, TeacherConfig, TeacherRequest, make_teacher
from selfinstruct.testing import FakeOpenAI
from selfinstruct.testing.responders import EvolveResponder

sys.path.insert(0, str(Path(__file__).parent))
from bench_filter import InstructionMaker


def serve(latency: float, conn) -> None:
    """Run the fake teacher until the parent asks; answer with the most requests it saw in flight at once."""
    with FakeOpenAI(responder=EvolveResponder(seed=1), latency=latency) as server:
        conn.send(server.url)
        while conn.recv() != "stop":
            conn.send(server.max_in_flight)
            server.clear()
        conn.send(server.max_in_flight)


def write_corpus(path: Path, n: int) -> None:
    maker = InstructionMaker(seed=7)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": maker.instruction(), "input": "", "output": "ok"}) + "\n")


def timed(method, spent: list[float]):
    """Wrap an `Evolver` method to add the CPU time of the calling thread it takes to `spent[0]`."""

    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - start

    return wrapper


def run(url: str, corpus: Path, out: Path, concurrency: int, rounds: int) -> dict:
    teacher = TeacherConfig(model="fake-model", base_url=[url], api_key_env="", concurrency=concurrency)
    cfg = EvolveConfig(input=str(corpus), out=str(out), rounds=rounds, teacher=teacher)
    spent = [0.0]  # CPU in evolve's own scheduling, parsing, eliminations and filters (on the event loop)
    handle, next_call = Evolver.handle, Evolver.next_call
    Evolver.handle, Evolver.next_call = timed(handle, spent), timed(next_call, spent)
    try:
        run_evolve(cfg, console=Console(stderr=True, quiet=True))
    finally:
        Evolver.handle, Evolver.next_call = handle, next_call
    s = json.loads((out / "summary.json").read_text())
    return {
        "records": s["records"],
        "decided": s["candidates"],
        "survived": s["kept"],
        "requests": s["requests"],
        "elapsed_s": s["session_elapsed_s"],
        "cpu_s": s["session_cpu_s"],
        "own_cpu_s": spent[0],
        "finished": s["finished"],
    }


def bare_teacher(url: str, concurrency: int, n: int) -> dict:
    """n rewrite-shaped requests straight through the teacher, `concurrency` in flight."""

    async def go() -> tuple[float, float]:
        teacher = make_teacher(
            TeacherConfig(model="fake-model", base_url=[url], api_key_env="", concurrency=concurrency)
        )
        await teacher.start()
        task = format_task(InstructionMaker(seed=3).instruction(), "")
        messages, _ = Prompts("chat").get("evol_deepen").render(task=task, instruction="", input="")
        sampling = Sampling(temperature=1.0, max_tokens=1024, json_schema=evolved_schema(None))
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
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="60 records (about half a minute)")
    args = p.parse_args()
    records = 60 if args.quick else args.records

    parent, child = mp.Pipe()
    server = mp.Process(target=serve, args=(args.latency, child), daemon=True)
    server.start()
    url = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, records)
            parent.send("reset")
            parent.recv()
            r = run(url, corpus, Path(tmp) / "run", args.concurrency, args.rounds)
            parent.send("reset")
            max_in_flight = parent.recv()
            bare = bare_teacher(url, args.concurrency, r["requests"])
    finally:
        parent.send("stop")
        parent.recv()
        server.join(timeout=10)

    ideal = args.concurrency / args.latency
    rps = r["requests"] / r["elapsed_s"]
    evolutions = r["decided"]
    cpu_ms = 1000 * r["cpu_s"] / evolutions
    ours_ms = cpu_ms - bare["cpu_ms_per_request"] * r["requests"] / evolutions
    print(
        f"fake server latency {args.latency * 1000:.0f} ms, chat + structured output, "
        f"{records} records x {args.rounds} rounds, concurrency {args.concurrency}"
    )
    print(
        f"evolutions decided {evolutions} ({r['survived']} survived), {r['requests']} requests in "
        f"{r['elapsed_s']:.2f} s: {rps:.1f} req/s; most in flight at once {max_in_flight} of {args.concurrency}"
    )
    print(f"efficiency vs ideal {ideal:.0f} req/s: {rps / ideal:.1%} (target >= 90%)")
    print(
        f"bare teacher, same requests: {bare['requests_per_s']:.1f} req/s ({bare['requests_per_s'] / ideal:.1%} of "
        f"ideal), {bare['cpu_ms_per_request']:.2f} ms CPU/request; evolve = {rps / bare['requests_per_s']:.1%} of bare"
    )
    print(
        f"CPU per evolution (record x round, {r['requests'] / evolutions:.2f} requests): {cpu_ms:.2f} ms total, "
        f"{ours_ms:.2f} ms ours (minus the bare teacher client's share; target < 2 ms); "
        f"{1000 * r['cpu_s'] / r['requests']:.2f} ms per request"
    )
    print(
        f"CPU per evolution in evolve's own code on the event loop (scheduling, prompts, parsing, eliminations, "
        f"filters; measured directly): {1000 * r['own_cpu_s'] / evolutions:.2f} ms"
    )
    if not r["finished"]:
        print("warning: the run did not finish")


if __name__ == "__main__":
    main()
