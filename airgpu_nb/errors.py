"""One root for every error airgpu-nb raises on purpose.

Shells (CLI, magics, widgets) turn an ``AirgpuError`` into one readable line; anything else is a
bug and keeps its traceback. Exceptions keep their message in ``args`` so they survive pickling
across Airflow's process boundaries (the nbclient habit).
"""

from __future__ import annotations

from collections.abc import Iterable


class AirgpuError(Exception):
    """Bad input or an environment problem the user can fix. Exit code 2 in the CLI."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotebookError(AirgpuError):
    """The notebook file is missing, unreadable, not a notebook or not a Python notebook."""


class SpecError(AirgpuError):
    """A promotion setting is invalid (DAG id, schedule, parameter, GPU request...)."""

    @classmethod
    def invalid_choice(cls, what: str, value: object, choices: Iterable[str]) -> SpecError:
        valid = ", ".join(sorted(choices))
        return cls(f"unknown {what} {value!r}; valid choices: {valid}")


class WriteError(AirgpuError):
    """Files could not be written, or writing would lose a user's edits."""


class RunError(AirgpuError):
    """The notebook ran and failed. Exit code 1: the input was fine, the run was not."""

    exit_code = 1

    def __init__(self, message: str, output_path: str | None = None) -> None:
        super().__init__(message)
        self.output_path = output_path

    def __reduce__(self):
        return (type(self), (self.message, self.output_path))
