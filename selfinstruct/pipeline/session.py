"""One session of a teacher-driven command (generate, evolve, magpie): the teacher started and closed around
the work, and SIGINT/SIGTERM turned into a gentle stop.

The first SIGINT (Ctrl-C) or SIGTERM (`kill`) sets `ctx.stop`: answers in flight are given up (the vLLM engine
aborts them between two steps), what is complete is written, the teacher shuts down. A second one stops the
process at once. The command then exits 130 after SIGINT, 143 (128 + 15, the shell's convention) after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from rich.console import Console

from selfinstruct.pipeline.stage import RunContext

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.asynccontextmanager
async def teacher_session(ctx: RunContext, own_teacher: bool, console: Console) -> AsyncIterator[None]:
    """Signal handlers installed and (when `own_teacher`) the teacher started for the block; both undone after."""
    loop = asyncio.get_running_loop()
    ctx.stop = asyncio.Event()

    def interrupt(sig: int) -> None:
        console.print("stopping: letting writes finish (Ctrl-C again to abort)", markup=False)
        ctx.signal = ctx.signal or sig
        ctx.stop.set()
        for s in STOP_SIGNALS:
            loop.remove_signal_handler(s)  # a second signal interrupts for real

    handled = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(sig, interrupt, sig)
            handled.append(sig)
    try:
        if own_teacher:
            await ctx.teacher.start()
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if own_teacher:
            await ctx.teacher.close()


def exit_code(ctx: RunContext) -> int:
    """0 when finished or stopped by a budget cap; 130 when interrupted by SIGINT, 143 by SIGTERM."""
    if ctx.stop_reason != "interrupted":
        return 0
    return 128 + signal.SIGTERM if ctx.signal == signal.SIGTERM else 130
