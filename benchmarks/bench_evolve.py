"""Benchmark `selfinstruct evolve` against an OpenAI-compatible server that answers after a fixed latency.

    python benchmarks/bench_evolve.py                        # 200 records, 3 rounds, concurrency 32, 0.2 s and 1 s
    python benchmarks/bench_evolve.py --latency 0.2 1 5      # any list of server latencies (seconds)
    python benchmarks/bench_evolve.py --quick                # 60 records

What it measures, per latency (chat prompts with structured output, the real command end to end: the `openai`
SDK over HTTP, rewrite → equality judge → answer per record and round, parsing, eliminations, heuristic + exact
ROUGE-L filters, fsynced JSONL journal):
  1. requests/s and efficiency = achieved requests/s ÷ ideal requests/s (concurrency / latency), plus the
     server's count of requests in flight: the peak, and the mean over the run (summed time requests spent in
     the server ÷ wall time; the pipeline should keep `--concurrency` of them busy);
  2. the same number of requests sent by the bare teacher (no parsing, filtering or writing): the ceiling this
     machine's CPU, the `openai` SDK and the Python test server allow, to tell the pipeline's overhead from theirs;
  3. CPU time of the evolve process per evolution (record × round: up to 3 requests), in all and in evolve's
     own code (scheduling, prompts, parsing, eliminations, filters: measured directly on the event loop).
At a short latency the client's CPU (mostly the `openai` SDK and httpx, a few ms per request) is what limits a
small machine; at a realistic API latency it is not, and efficiency shows what the pipeline itself allows.
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
    """Run the fake teacher until the parent says stop; on each message answer with the most requests it saw
    in flight at once and the seconds they spent in it (summed) since the last one, and start counting anew."""
    with FakeOpenAI(responder=EvolveResponder(seed=1), latency=latency) as server:
        conn.send(server.url)
        while True:
            message = conn.recv()
            conn.send((server.max_in_flight, server.busy_s))
            server.clear()
            if message == "stop":
                return


class Server:
    """The fake teacher in a child process, answering after `latency` seconds."""

    def __init__(self, latency: float):
        self.conn, child = mp.Pipe()
        self.process = mp.Process(target=serve, args=(latency, child), daemon=True)
        self.process.start()
        self.url = self.conn.recv()

    def in_flight(self, message: str = "reset") -> tuple[int, float]:
        """(peak in flight, busy seconds) since the previous call."""
        self.conn.send(message)
        return self.conn.recv()

    def stop(self) -> None:
        self.in_flight("stop")
        self.process.join(timeout=10)


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
    """n rewrite-shaped requests straight through the teacher, `concurrency` in flight; wall and CPU seconds of
    the requests alone (not the client's start-up)."""

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
    return {"elapsed_s": wall, "requests_per_s": n / wall, "cpu_ms_per_request": 1000 * cpu / n}


def measure(latency: float, records: int, args: argparse.Namespace) -> dict:
    """One evolve run and the bare teacher with as many requests, against a server answering after `latency`."""
    server = Server(latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, records)
            server.in_flight()
            r = run(server.url, corpus, Path(tmp) / "run", args.concurrency, args.rounds)
            r["peak"], busy = server.in_flight()
            r["mean"] = busy / r["elapsed_s"]
            bare = bare_teacher(server.url, args.concurrency, r["requests"])
            bare["peak"], busy = server.in_flight()
            bare["mean"] = busy / bare["elapsed_s"]
    finally:
        server.stop()
    return {"latency": latency, "evolve": r, "bare": bare}


def report(m: dict, concurrency: int) -> dict:
    """Print one latency's numbers; return the row of the closing table."""
    r, bare, latency = m["evolve"], m["bare"], m["latency"]
    ideal = concurrency / latency
    rps = r["requests"] / r["elapsed_s"]
    evolutions = r["decided"]
    cpu_ms = 1000 * r["cpu_s"] / evolutions
    ours_ms = 1000 * r["own_cpu_s"] / evolutions
    client_ms = bare["cpu_ms_per_request"]
    print(f"\nlatency {latency * 1000:.0f} ms: ideal {ideal:.1f} requests/s ({concurrency} in flight)")
    print(
        f"  evolve        {evolutions} evolutions ({r['survived']} survived), {r['requests']} requests in "
        f"{r['elapsed_s']:.2f} s: {rps:.1f} req/s = {rps / ideal:.1%} of ideal; in flight peak {r['peak']}, "
        f"mean {r['mean']:.1f} of {concurrency}"
    )
    print(
        f"  bare teacher  {r['requests']} requests in {bare['elapsed_s']:.2f} s: {bare['requests_per_s']:.1f} req/s "
        f"= {bare['requests_per_s'] / ideal:.1%} of ideal; in flight peak {bare['peak']}, mean {bare['mean']:.1f}; "
        f"{client_ms:.2f} ms CPU per request; evolve = {rps / bare['requests_per_s']:.1%} of bare"
    )
    print(
        f"  CPU per evolution ({r['requests'] / evolutions:.2f} requests): {cpu_ms:.2f} ms in all, "
        f"{ours_ms:.2f} ms in evolve's own code (target < 2 ms), "
        f"{cpu_ms - client_ms * r['requests'] / evolutions:.2f} ms minus the bare client's share"
    )
    if not r["finished"]:
        print("  warning: the run did not finish")
    return {
        "latency_ms": round(latency * 1000),
        "ideal": ideal,
        "evolve": rps,
        "bare": bare["requests_per_s"],
        "mean": r["mean"],
        "ours_ms": ours_ms,
        "cpu_ms": cpu_ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--latency", type=float, nargs="+", default=[0.2, 1.0], help="server latencies in seconds (a list)"
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="60 records")
    args = p.parse_args()
    records = 60 if args.quick else args.records
    print(
        f"evolve: {records} records x {args.rounds} rounds, chat + structured output, "
        f"concurrency {args.concurrency}, fake server latencies {', '.join(f'{x:g} s' for x in args.latency)}"
    )
    rows = [report(measure(latency, records, args), args.concurrency) for latency in args.latency]
    print(
        "\nlatency   ideal req/s   evolve req/s (of ideal)   bare req/s (of ideal)   mean in flight   CPU/evolution"
    )
    for row in rows:
        print(
            f"{row['latency_ms']:>5} ms   {row['ideal']:>11.1f}   {row['evolve']:>8.1f} ({row['evolve'] / row['ideal']:>6.1%})"
            f"        {row['bare']:>8.1f} ({row['bare'] / row['ideal']:>6.1%})   {row['mean']:>14.1f}   "
            f"{row['ours_ms']:.2f} ms ours, {row['cpu_ms']:.2f} ms in all"
        )


if __name__ == "__main__":
    main()
