"""Teachers: the LLMs that write instructions and instances. `make_teacher(cfg)` picks the backend.

Backends are imported on demand so that choosing one never imports the other (the vLLM backend pulls in
torch; the OpenAI one only the `openai` SDK).
"""

from __future__ import annotations

from selfinstruct.teachers.base import (
    Choice,
    Sampling,
    Teacher,
    TeacherRequest,
    TeacherResponse,
    TeacherStats,
    Usage,
)
from selfinstruct.teachers.config import TeacherConfig

__all__ = [
    "Choice",
    "Sampling",
    "Teacher",
    "TeacherConfig",
    "TeacherRequest",
    "TeacherResponse",
    "TeacherStats",
    "Usage",
    "make_teacher",
]


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """A not-yet-started teacher for `cfg`; call `await teacher.start()` before generating."""
    if cfg.backend == "vllm":
        from selfinstruct.teachers.vllm_engine import VLLMTeacher

        return VLLMTeacher(cfg)
    from selfinstruct.teachers.openai_compat import OpenAITeacher

    return OpenAITeacher(cfg)
