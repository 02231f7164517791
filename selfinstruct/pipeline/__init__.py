"""The generation pipelines, built from stages.

Self-Instruct: bootstrap → classify → instances → finetune. Alpaca: alpaca → finetune. Each teacher-driven
stage is resumable on its own: it derives what is left to do from the append-only files in the run directory
(bootstrap: the kept instructions; classify/instances: instruction ids without a result), so rerunning the
same command continues where a crash, Ctrl-C or budget cap stopped it. `finetune` (module `prepare`) is cheap
and rebuilds `corpus.jsonl` from those files every time.

Modules: `stage` (the `Stage` declaration, the shared `RunContext` and the stage base classes), one module per
stage, `registry` (stages by name, pipelines, per-stage decoding, `run_pipeline`), `runner` (the in-flight loop,
the journal, budget caps), `session` (teacher start/close and signals). The names below keep their old import
path (`from selfinstruct.pipeline import RunContext, CORPUS`) for commands built on the same machinery; the
file names live in `selfinstruct.rundir`.
"""

from selfinstruct.pipeline.stage import (
    PerInstruction,
    RunContext,
    StageStats,
    owned_records,
    read_keyed,
    run_stage,
)
from selfinstruct.rundir import CLASSIFICATION, CORPUS, INSTANCES, INSTRUCTIONS, JOURNALED, REJECTED

__all__ = [
    "CLASSIFICATION",
    "CORPUS",
    "INSTANCES",
    "INSTRUCTIONS",
    "JOURNALED",
    "REJECTED",
    "PerInstruction",
    "RunContext",
    "StageStats",
    "owned_records",
    "read_keyed",
    "run_stage",
]
