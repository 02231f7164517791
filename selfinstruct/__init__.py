"""selfinstruct: grow an instruction corpus from seed tasks with a teacher LLM, filter it, and tune on it."""

__version__ = "0.1.0"
