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
    "teacher_class",
]


def teacher_class(cfg: TeacherConfig) -> type[Teacher]:
    """The backend class `cfg` picks, for its class-level capabilities (e.g. `in_process`) before building one."""
    if cfg.backend == "vllm":
        from selfinstruct.teachers.vllm_engine import VLLMTeacher

        return VLLMTeacher
    from selfinstruct.teachers.openai_compat import OpenAITeacher

    return OpenAITeacher


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """A not-yet-started teacher for `cfg`; call `await teacher.start()` before generating."""
    return teacher_class(cfg)(cfg)
