"""Time `selfinstruct magpie` with the small real offline model, end to end, as a user runs it.

    python benchmarks/bench_magpie.py                              # 20 kept queries (the acceptance goal)
    python benchmarks/bench_magpie.py --num-instructions 3         # a quick check that it runs

One `selfinstruct magpie` process with SmolLM2-135M-Instruct in the in-process vLLM engine on the CPU (the
README's flags: float32, eager, 10% of RAM, 1 GiB KV cache), timed from launch to exit, so the engine's start
counts. It prints the wall time, the kept queries and answered records (`summary.json`), the time in each stage
and what the rest (imports, engine start, shutdown) took, and whether the goal holds: at least 20 kept
instructions in at most 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_KEPT, GOAL_S = 20, 300.0
CPU_ENGINE = ["--teacher-dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, directory or .gguf")
    parser.add_argument("--num-instructions", type=int, default=GOAL_KEPT)
    parser.add_argument("--query-max-tokens", type=int, default=128)
    parser.add_argument("--answer-max-tokens", type=int, default=256)
    parser.add_argument("--out", help="run directory (default: a fresh temporary one)")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_magpie_")) / "run"
    command = [
        "magpie", "--out", str(out), "--num-instructions", str(args.num_instructions),
        "--teacher", "vllm", "--model", args.model, "--max-model-len", "2048", *CPU_ENGINE,
        "--query-max-tokens", str(args.query_max_tokens), "--answer-max-tokens", str(args.answer_max_tokens),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    print("$ selfinstruct " + " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.run(
        [sys.executable, "-c", "from selfinstruct.cli import main; main()", *command], env=env
    ).returncode
    wall = time.monotonic() - started
    if code != 0:
        sys.exit(f"magpie exited with {code} after {wall:.1f} s")

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    stages = {name: s["elapsed_s"] for name, s in summary["stages"].items()}
    in_stages = sum(stages.values())
    print(f"\nwall time           {wall:.1f} s (launch to exit)")
    print(
        f"kept queries        {summary['kept']} of {summary['target']} ({summary['candidates']} candidates)"
    )
    print(f"answered records    {summary['corpus_records']} in corpus.jsonl")
    print("stages              " + ", ".join(f"{name} {s:.1f} s" for name, s in stages.items()))
    print(f"the rest            {wall - in_stages:.1f} s (imports, engine start, shutdown)")
    met = summary["kept"] >= GOAL_KEPT and wall <= GOAL_S
    print(f"goal                >= {GOAL_KEPT} kept in <= {GOAL_S:.0f} s: {'met' if met else 'NOT met'}")
    print(f"run directory       {out}")


if __name__ == "__main__":
    main()
