"""One table of promotion settings: every setting declared once, every input layer parsed by it.

A row names a setting, its type (a :class:`Kind` that parses command-line text and checks typed
values from TOML, JSON or Python), its default, its help, the targets that take it and how the
panel shows it. From the table come: the ``promote`` options of the CLI and the magics, the
panel's form, the typed check of ``[tool.airgpu]`` and of notebook metadata, the settings a
prepared notebook records and the "regenerate" command in every DAG header.

Every layer is untrusted and goes through the same ``Kind.check``; a bad value is one line naming
the layer, the key, what it got and what it wants::

    pyproject.toml [tool.airgpu] tags: expected a list of strings, got 5

No I/O here and no Airflow, Docker or TensorFlow imports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .kinds import (
    Boolean,
    Checked,
    Choice,
    Date,
    Gpus,
    Integer,
    Invalid,
    Kind,
    Pairs,
    Parameters,
    Schedule,
    Text,
    TextList,
    _show,
    has_control_characters,
)
from .spec import DEFAULT_START_DATE, KNOWN_MIG_PROFILES, validate_dag_id

__all__ = ["BY_NAME", "SETTINGS", "Boolean", "Integer", "Invalid", "Kind", "Setting",
           "SpecError", "has_control_characters", "parse_layer", "spec_settings"]

#: Longest duration a retry delay or a task timeout may have (Airflow stores them as timedelta;
#: a 20-digit number of seconds overflows it and the DAG would not import).
MAX_SECONDS = 30 * 86400
_KERNEL_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
_TAG_MAX = 100


# -- the table ------------------------------------------------------------------------------------

ALL_TARGETS = None  # a row for every target
CONTAINERS = frozenset({"docker", "kubernetes"})
K8S = frozenset({"kubernetes"})
DOCKER = frozenset({"docker"})
# Both pod targets: the KubernetesPodOperator's pod and a KubernetesExecutor worker pod.
PODS = frozenset({"kubernetes", "kubernetes-executor"})
RESOURCES = CONTAINERS | {"kubernetes-executor"}  # cpu, memory, /dev/shm, user, outputs


@dataclass(frozen=True)
class Setting:
    """One row: a promotion setting, declared once."""

    name: str
    kind: Kind
    default: Any
    help: str
    flag: str = ""  # default: --name-with-dashes
    metavar: str | None = None
    targets: frozenset[str] | None = ALL_TARGETS
    panel: str | None = None  # "text", "choice", "check"; None: not in the panel's form
    repeat: bool = False  # a repeatable option (lists)
    from_notebook: bool = True  # False: a notebook's metadata may record it, never set it
    option: bool = False  # target-specific: kept in ``PromotionSpec.options``
    in_spec: bool = True  # False: steers promotion but is not part of the DAG (dags_dir)
    needs: str = ""  # what a target must offer, for the wrong-target message
    label: str = ""  # the panel's words for it (default: the name)
    unset_label: str = "none"  # the panel's words for a choice left unset

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def takes(self, target: str) -> bool:
        return self.targets is None or target in self.targets

    def parse(self, value: Any, layer: str) -> Any:
        """``value`` checked for this row; a bad one is a ``SpecError`` naming layer and key."""
        try:
            return self.kind.check(value)
        except Invalid as exc:
            raise SpecError(f"{layer} {self.name}: {exc}") from None

    def parse_text(self, text: str, layer: str = "") -> Any:
        try:
            return self.kind.from_text(text)
        except Invalid as exc:
            raise SpecError(f"{layer or self.cli_flag}: {exc}") from None


def _targets() -> list[str]:
    from .targets import names

    return names()


def _mig_profiles() -> frozenset[str]:
    return KNOWN_MIG_PROFILES


def _check_image(value: str) -> None:
    if not _IMAGE_RE.fullmatch(value):
        raise SpecError(f"invalid image reference {value!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting("target", Choice("target", _targets), "local",
            "where the notebook runs (default: local, the Airflow worker itself)",
            panel="choice"),
    Setting("dag_id", Checked("a DAG id", validate_dag_id), None,
            "DAG id (default: the notebook's file name made safe)", panel="text",
            label="DAG id"),
    Setting("schedule", Schedule(), None, "cron expression or preset such as @daily; 'none' "
            "to trigger by hand (default: none)", panel="schedule"),
    Setting("gpus", Gpus(), 1, "GPUs the run needs (default: 1)", metavar="N|all",
            panel="text", label="GPUs"),
    Setting("mig", Choice("MIG profile", _mig_profiles, none_word="none"), None,
            "one MIG slice instead of whole GPUs, e.g. 1g.10gb", metavar="PROFILE", targets=PODS,
            panel="choice", label="MIG slice", unset_label="whole GPUs",
            needs="a target that can request a MIG slice (kubernetes, kubernetes-executor)"),
    Setting("allow_cpu", Boolean(), False, "run on CPU when the GPUs are missing instead of "
            "failing (default: fail)", panel="check", label="allow CPU when no GPU"),
    Setting("kernel", Text("a kernelspec name (letters, digits, '.', '_', '-')", _KERNEL_RE),
            None, "Jupyter kernel that runs the notebook (default: the notebook's own; a "
            "Python kernel that is not installed here is run with python3)", metavar="NAME"),
    Setting("allow_new_parameters", Boolean(), False, "let -p/-r add names the parameters "
            "cell does not define (papermill's behaviour; default: refuse them)", panel="check",
            label="allow new parameters"),
    Setting("parameters", Parameters(), None, "parameter values (-p NAME VALUE / -r NAME "
            "VALUE)", flag="--parameter", panel="parameters"),
    Setting("image", Checked("a container image reference", _check_image), None,
            "container image (default: the airgpu-nb runtime image)", targets=RESOURCES,
            panel="text"),
    Setting("output_dir", Text("a folder path"), None,
            "where runs keep executed notebooks (default: $AIRGPU_OUTPUT_DIR or "
            "$AIRFLOW_HOME/airgpu-outputs); relative to the DAG file", metavar="DIR"),
    Setting("dags_dir", Text("a folder path"), None, "where the DAG and the prepared notebook "
            "are written (default: $AIRGPU_DAGS_DIR or ./dags); never taken from a notebook",
            metavar="DIR", from_notebook=False, in_spec=False),
    Setting("start_date", Date(), DEFAULT_START_DATE, "first data interval, YYYY-MM-DD "
            f"(default: {DEFAULT_START_DATE})", metavar="DATE"),
    Setting("catchup", Boolean(), False, "run the intervals missed since the start date "
            "(default: no)"),
    Setting("retries", Integer(0, 100), 1, "task retries (default: 1)", metavar="N"),
    Setting("retry_delay_s", Integer(0, MAX_SECONDS, " of seconds"), 300, "seconds between "
            "retries (default: 300)", flag="--retry-delay", metavar="SECONDS"),
    Setting("execution_timeout_s", Integer(1, MAX_SECONDS, " of seconds"), 6 * 3600,
            "task execution timeout in seconds (default: 21600)", flag="--timeout",
            metavar="SECONDS"),
    Setting("tags", TextList(Text(f"tags of at most {_TAG_MAX} characters",
                                  max_len=_TAG_MAX)), ["airgpu"],
            "DAG tag; repeatable (default: airgpu)", flag="--tag", metavar="TAG", repeat=True),
    Setting("telemetry", Boolean(), True, "sample GPU utilisation into the executed notebook "
            "(default: yes)"),
    # What the notebook carries (airgpu_nb.bundle); kept in ``PromotionSpec.options``.
    Setting("include", TextList(Text("a path relative to the notebook's folder, without '..'",
                                     re.compile(r"(?![/\\~]|[A-Za-z]:)"
                                                r"(?!(?:.*[/\\])?\.\.(?:[/\\]|$)).+"))),
            None, "also carry PATH (a file or folder, relative to the notebook's folder) in "
            "the bundle beside the DAG; repeatable", metavar="PATH", repeat=True, option=True),
    Setting("exclude", TextList(Text("a path or glob relative to the notebook's folder, "
                                     "without '..'",
                                     re.compile(r"(?![/\\~]|[A-Za-z]:)"
                                                r"(?!(?:.*[/\\])?\.\.(?:[/\\]|$)).+"))),
            None, "leave PATH (or a glob such as 'data/*.parquet') out of the bundle; "
            "repeatable", metavar="PATH", repeat=True, option=True),
    Setting("bundle_limit_mb", Integer(1, 1_000_000, " of MB"), None, "largest bundle of "
            "carried files in MB (default: 100); read bigger data from a mounted volume or "
            "an object-store URL instead", flag="--bundle-limit", metavar="MB", option=True),
    Setting("paused", Boolean(), False, "create the DAG paused on the deployment (Airflow's "
            "[core] dags_are_paused_at_creation); default: not paused, it was promoted to run",
            option=True),
    Setting("allow_missing_packages", Boolean(), False, "run even when the worker lacks a "
            "package the notebook imports (default: the verification cell fails)",
            option=True),
    Setting("requirements", Boolean(), False, "also write <dag_id>.requirements.txt beside "
            "the DAG, pinning the packages the notebook imports (default: no)",
            in_spec=False),
    # Target-specific options (``PromotionSpec.options``); the target checks them in depth.
    Setting("cpu", Text("CPU cores such as 2, 0.5 or 500m", re.compile(r"\d+(\.\d+)?m?"),
                        numbers=True), None,
            "CPU cores (kubernetes: requests = limits, default 2; docker: a CPU limit)",
            targets=RESOURCES, option=True),
    Setting("memory", Text("a size such as 16g or 16Gi", numbers=True), None,
            "memory limit, e.g. 16g or 16Gi (kubernetes default 8Gi; must exceed --shm-size)",
            targets=RESOURCES, option=True),
    Setting("shm_size", Text("a size such as 2g", numbers=True), None,
            "size of /dev/shm (default 2g)", targets=RESOURCES, option=True),
    Setting("user", Text("UID[:GID]", re.compile(r"\d+(:\d+)?"), numbers=True), None,
            "non-root user the notebook runs as (default 1000:1000, the runtime image's user; "
            "kubernetes-executor: 50000:50000, the Airflow image's)",
            metavar="UID[:GID]", targets=RESOURCES, option=True),
    Setting("notebooks_volume", Text("a volume, claim or host path"), None, "where the "
            "container finds the prepared notebook: docker: host path or volume (default: the "
            "DAG folder); kubernetes: PVC name (default: baked into the image)",
            metavar="SOURCE", targets=CONTAINERS, option=True),
    Setting("outputs_volume", Text("a volume, claim or host path"), None, "where executed "
            "notebooks go: docker: host path or volume (default volume airgpu-outputs); "
            "kubernetes: PVC name (default airgpu-outputs)", metavar="SOURCE",
            targets=RESOURCES, option=True),
    Setting("outputs_url", Text("an object-store URL"), None, "write executed notebooks to an "
            "object store instead (s3://, gs://, abs://, adl://, hdfs://)", metavar="URL",
            targets=CONTAINERS, option=True),
    Setting("device_ids", TextList(Text("GPU indices or UUIDs")), None, "docker: a GPU index "
            "or UUID to reserve; repeatable (with --gpus equal to their number)",
            flag="--device-id", metavar="ID", targets=DOCKER, repeat=True, option=True),
    Setting("namespace", Text("a Kubernetes namespace"), None, "namespace of the pod",
            targets=K8S, option=True),
    Setting("service_account", Text("a Kubernetes service account"), None,
            "service account of the pod", targets=PODS, option=True),
    Setting("node_selector", Pairs(), None, "extra node label to match, beside "
            "nvidia.com/gpu.present=true; repeatable", metavar="KEY=VALUE", targets=PODS,
            repeat=True, option=True, panel="list"),
    Setting("tolerations", TextList(Text("KEY[=VALUE]:EFFECT")), None, "tolerate a GPU node "
            "pool's taint, beside nvidia.com/gpu; repeatable", flag="--toleration",
            metavar="KEY[=VALUE]:EFFECT", targets=PODS, repeat=True, option=True, panel="list"),
    Setting("gpu_product", Text("a node label value"), None, "node label "
            "nvidia.com/gpu.product to match, e.g. NVIDIA-A100-SXM4-80GB", metavar="LABEL",
            targets=PODS, option=True),
    Setting("gpu_sharing", Choice("GPU sharing mode", lambda: ("shared",)), None,
            "request time-sliced nvidia.com/gpu.shared instead of whole GPUs", metavar="shared",
            targets=PODS, option=True),
    Setting("kueue_queue", Text("a Kueue LocalQueue name"), None, "Kueue LocalQueue that "
            "admits the pod (label kueue.x-k8s.io/queue-name)", metavar="QUEUE", targets=PODS,
            option=True),
    Setting("priority_class", Text("a PriorityClass name"), None, "priorityClassName of the "
            "pod, for schedulers that order or preempt by priority", metavar="NAME",
            targets=PODS, option=True),
    Setting("safe_to_evict", Boolean(), None, "annotation cluster-autoscaler.kubernetes.io/"
            "safe-to-evict: --no-safe-to-evict keeps a scale-down from evicting a running "
            "training pod (default: no annotation)", targets=PODS, option=True),
    Setting("task_executor", Boolean(), None, "set the task's executor=\"KubernetesExecutor\" "
            "for a deployment whose default executor is another (Airflow's multiple executors; "
            "default: the deployment's default executor)", targets=frozenset(
                {"kubernetes-executor"}), option=True),
)
BY_NAME: Mapping[str, Setting] = {row.name: row for row in SETTINGS}
OPTION_NAMES = frozenset(row.name for row in SETTINGS if row.option)


def row(name: str) -> Setting:
    return BY_NAME[name]


def flag(name: str) -> str:
    """The promote flag that sets ``name`` (for messages)."""
    return BY_NAME[name].cli_flag if name in BY_NAME else f"option {name!r}"


def takers(name: str) -> list[str]:
    targets = BY_NAME[name].targets if name in BY_NAME else None
    return sorted(targets) if targets is not None else []


# -- layers ---------------------------------------------------------------------------------------

def parse_layer(data: Any, layer: str, *, from_notebook: bool = False) -> dict[str, Any]:
    """One settings layer (``[tool.airgpu]``, notebook metadata, explicit options) checked.

    Unknown keys are named; values go through their row's kind. A notebook's metadata may not
    choose where files are written: ``dags_dir`` there is ignored (it is recorded, not obeyed),
    and its ``output_dir`` must be a relative path that stays inside the output root.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"{layer}: expected a table of settings, got {_show(data)}")
    data = dict(data)
    legacy = data.pop("options", None)  # earlier prepared copies nest target options here
    if legacy is not None:
        if not isinstance(legacy, Mapping):
            raise SpecError(f"{layer} options: expected a table, got {_show(legacy)}")
        for key, value in legacy.items():
            if key not in OPTION_NAMES:
                raise SpecError(f"{layer} options: unknown setting {key!r}")
            data.setdefault(key, value)
    unknown = sorted(str(k) for k in data if k not in BY_NAME)
    if unknown:
        raise SpecError(f"{layer}: unknown setting {unknown[0]!r}; valid: "
                        f"{', '.join(sorted(BY_NAME))}")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        setting = BY_NAME[key]
        if from_notebook and not setting.from_notebook:
            continue
        if value is None:
            continue
        checked[key] = setting.parse(value, layer)
        if from_notebook and key == "output_dir":
            _inside_output_root(checked[key], layer)
    return checked


def _inside_output_root(path: str, layer: str) -> None:
    parts = re.split(r"[\\/]+", path)
    if path.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", path) or ".." in parts:
        raise SpecError(f"{layer} output_dir: a notebook may only name a relative folder inside "
                        f"the output root, got {path!r}; pass --output-dir to choose another")


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; ``parameters`` merge name by name."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "parameters":
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return merged


def check_targets(settings: Mapping[str, Any], target: str, layer: str = "") -> None:
    """Refuse an explicit setting that ``target`` cannot use, naming the target that can."""
    for key, value in settings.items():
        setting = BY_NAME.get(key)
        if setting is None or value is None or setting.takes(target):
            continue
        if setting.needs:
            raise SpecError(f"{setting.cli_flag} needs {setting.needs}, not {target!r}")
        hint = f" (it is for the {' or '.join(takers(key))} target)" if setting.targets else ""
        raise SpecError(f"target {target!r} does not take {setting.cli_flag}{hint}")


def applicable(settings: Mapping[str, Any], target: str) -> dict[str, Any]:
    """What a file layer (shared by many notebooks) says that this target can use."""
    return {k: v for k, v in settings.items() if k not in BY_NAME or BY_NAME[k].takes(target)}


def spec_settings(spec: Any) -> dict[str, Any]:
    """A spec's settings, row by row: what a prepared notebook records and regenerate uses."""
    found: dict[str, Any] = {}
    options = spec.option_map
    for setting in SETTINGS:
        if not setting.in_spec:
            continue
        if setting.option:
            value = options.get(setting.name)
        elif setting.name == "gpus":
            value = spec.gpu.count
        elif setting.name == "mig":
            value = spec.gpu.mig
        elif setting.name == "parameters":
            value = dict(spec.parameters)
        else:
            value = getattr(spec, setting.name)
        found[setting.name] = list(value) if isinstance(value, tuple) else value
    return found
