"""What a promotion asks for, validated once, then frozen.

No I/O here and no Airflow, Docker or TensorFlow imports: every shell reaches a
``PromotionSpec`` through ``promote()``, which parses each settings layer with the settings table
(:mod:`airgpu_nb.settings`); everything downstream (injection, rendering, running) trusts it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import keyword
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

ParamValue = str | int | float | bool | None

DAG_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,250}")  # always fullmatch()
SCHEDULE_PRESETS = frozenset(
    {"@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
)
# Names the verification cell owns: a user parameter may not shadow them.
RESERVED_PARAMETERS = frozenset({"gpus_requested", "allow_cpu"})
DEFAULT_START_DATE = "2025-01-01"

# MIG profiles by GPU (NVIDIA MIG user guide). The resource name in Kubernetes is
# ``nvidia.com/mig-<profile>`` under the "mixed" MIG strategy.
MIG_PROFILES: Mapping[str, tuple[str, ...]] = {
    "A100-40GB": ("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    "A100-80GB": ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-80GB": ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-94GB": ("1g.12gb", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"),
    "H200-141GB": ("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
}
KNOWN_MIG_PROFILES = frozenset(p for profiles in MIG_PROFILES.values() for p in profiles)


@dataclass(frozen=True)
class GpuRequest:
    """How many GPUs a run needs, or which MIG slice.

    ``count`` is a number of whole GPUs or ``"all"``; ``mig`` names a MIG profile such as
    ``"1g.10gb"`` (then the run needs one slice and ``count`` is 1).
    """

    count: int | str = 1
    mig: str | None = None

    def __post_init__(self) -> None:
        count = self.count
        if isinstance(count, bool) or not (
            (isinstance(count, int) and count >= 0) or count == "all"
        ):
            raise SpecError(f"GPU count must be a whole number >= 0 or 'all', not {count!r}")
        if self.mig is not None:
            if self.mig not in KNOWN_MIG_PROFILES:
                raise SpecError.invalid_choice("MIG profile", self.mig, KNOWN_MIG_PROFILES)
            if count != 1:
                raise SpecError("--mig asks for one MIG slice; do not combine it with --gpus")

    @property
    def slots(self) -> int:
        """Airflow pool slots this run takes in the ``gpu`` pool (at least 1)."""
        return self.count if isinstance(self.count, int) and self.count > 0 else 1


@dataclass(frozen=True)
class PromotionSpec:
    """Everything a DAG and its prepared notebook are made from."""

    dag_id: str
    notebook_name: str  # file name of the source notebook, used for executed copies
    source: str = ""  # path of the source notebook as the user gave it (documentation only)
    target: str = "local"
    schedule: str | None = None
    start_date: str = DEFAULT_START_DATE
    catchup: bool = False
    retries: int = 1
    retry_delay_s: int = 300
    execution_timeout_s: int | None = 6 * 3600
    tags: tuple[str, ...] = ("airgpu",)
    parameters: tuple[tuple[str, ParamValue], ...] = ()
    gpu: GpuRequest = field(default_factory=GpuRequest)
    allow_cpu: bool = False
    allow_new_parameters: bool = False
    kernel: str = "python3"
    output_dir: str | None = None
    image: str | None = None
    telemetry: bool = True
    options: tuple[tuple[str, Any], ...] = ()  # target-specific, validated by the target

    def __post_init__(self) -> None:
        validate_dag_id(self.dag_id)
        validate_schedule(self.schedule)
        _validate_date(self.start_date)
        for name, value in self.parameters:
            validate_parameter(name, value)
        for what, value in (("retries", self.retries), ("retry delay", self.retry_delay_s)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{what} must be a whole number >= 0, not {value!r}")
        timeout = self.execution_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout <= 0):
            raise SpecError(
                f"execution timeout must be a positive number of seconds, not {timeout!r}")
        for tag in self.tags:
            if not isinstance(tag, str) or not tag.strip() or len(tag) > 100 or any(
                    ch in tag for ch in "\n\r\x00"):
                raise SpecError(f"tags must be non-empty strings of <= 100 characters: {tag!r}")
        if not self.kernel or not isinstance(self.kernel, str):
            raise SpecError("kernel name must be a non-empty string")

    @property
    def params(self) -> dict[str, ParamValue]:
        return dict(self.parameters)

    @property
    def option_map(self) -> dict[str, Any]:
        return dict(self.options)

    def replace(self, **changes: Any) -> PromotionSpec:
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The settings recorded in the prepared notebook so re-promotion reproduces them (one
        entry per row of the settings table)."""
        from .settings import spec_settings

        return spec_settings(self)


def validate_dag_id(dag_id: object) -> str:
    if not isinstance(dag_id, str) or not DAG_ID_RE.fullmatch(dag_id):
        raise SpecError(
            f"invalid DAG id {dag_id!r}: use 1-250 letters, digits, '_', '.' or '-'"
        )
    return dag_id


def safe_dag_id(name: str) -> str:
    """A DAG id made from a notebook's file name: invalid characters become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")[:250]
    return cleaned or "notebook"


def validate_schedule(schedule: object) -> str | None:
    if schedule is None:
        return None
    if not isinstance(schedule, str) or not schedule.strip():
        raise SpecError(f"invalid schedule {schedule!r}")
    if schedule.startswith("@"):
        if schedule not in SCHEDULE_PRESETS:
            raise SpecError.invalid_choice("schedule preset", schedule, SCHEDULE_PRESETS)
        return schedule
    try:
        from croniter import croniter
    except ImportError:  # pragma: no cover - croniter ships with Airflow
        croniter = None
    fields = schedule.split()
    valid = len(fields) == 5 and (croniter is None or croniter.is_valid(schedule))
    if not valid:
        raise SpecError(
            f"invalid schedule {schedule!r}: use a 5-field cron expression such as '0 2 * * *', "
            f"a preset ({', '.join(sorted(SCHEDULE_PRESETS))}) or 'none'"
        )
    return schedule


def _validate_date(value: str) -> None:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError(value)
        dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise SpecError(f"invalid start date {value!r}: use YYYY-MM-DD") from None


def validate_parameter(name: object, value: object) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) \
            or name.startswith("__"):
        raise SpecError(f"invalid parameter name {name!r}: it must be a Python identifier, not "
                        "a keyword and not a __dunder__ name")
    if name in RESERVED_PARAMETERS:
        raise SpecError(
            f"parameter {name!r} belongs to the GPU check; use --gpus / --allow-cpu instead"
        )
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise SpecError(
            f"parameter {name!r} must be a string, number, boolean or None, not "
            f"{type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(
            f"parameter {name!r} is {value!r}, which has no Python literal; "
            f"pass it with -r to keep it a string"
        )


def parse_value(text: str) -> ParamValue:
    """Read a ``-p`` value the way papermill's CLI does: bool, None, int, float, else str."""
    if text == "True":
        return True
    if text == "False":
        return False
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_gpus(text: str | int) -> int | str:
    """``--gpus N|all``: the CLI hands us text; an error names what is accepted."""
    if isinstance(text, int):
        return text
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"--gpus takes a whole number >= 0 or 'all', not {text!r}") from None
    if value < 0:
        raise SpecError(f"--gpus must be >= 0, not {value}")
    return value


def normalise_schedule(text: str | None) -> str | None:
    """Accept 'none'/'None'/'' for an unscheduled DAG (triggered by hand)."""
    if text is None or text.strip().lower() in {"", "none", "null"}:
        return None
    return text.strip()
