"""docker/: the compose stack is valid against the compose spec and wires the GPU worker the way
the compose target relies on; every Dockerfile passes hadolint; no secret is shipped."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
# The test stack's PostgreSQL and Redis stand-ins (tests/compose/) are held to the same bars.
LINTED = [*DOCKERFILES, ROOT / "tests" / "compose" / "Dockerfile.services"]
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler",
                    "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
                    "airflow-worker-gpu"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_is_valid_against_the_compose_spec():
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema",
                             "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_invalid_compose_file_is_caught_by_the_same_check(tmp_path):
    """The check above can fail: a misspelt reservation key is rejected."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]\n",
                                                  "capabilites: [gpu]\n", 1))
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema",
                             "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


@pytest.mark.parametrize("dockerfile", LINTED, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile):
    result = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_three_images_exist_and_run_as_non_root():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.runtime", "Dockerfile.airflow",
                                             "Dockerfile.gpu-worker", "Dockerfile.base"}
    runtime = (DOCKER / "Dockerfile.runtime").read_text()
    # The official base is the default; `make images` passes a local one where it cannot pull.
    assert re.search(r"^ARG BASE_IMAGE=tensorflow/tensorflow:\d+\.\d+\.\d+-gpu$", runtime, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", runtime, re.M)
    assert re.search(r"^USER 1000:1000$", runtime, re.M)  # numeric: runAsNonRoot can verify
    for name in ("Dockerfile.airflow", "Dockerfile.gpu-worker"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^ARG BASE_IMAGE=apache/airflow:3\.3\.\d+-python3\.\d+$", text, re.M)
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
        assert "USER root" not in text  # the Airflow image's user stays `airflow`
    assert 'TF_REQUIREMENT="tensorflow[and-cuda]==' in (
        DOCKER / "Dockerfile.gpu-worker").read_text()


def test_a_build_proxy_ca_is_only_ever_a_buildkit_secret():
    """Every pip install may read the CA from the `pip_ca` secret; no Dockerfile takes it as an
    ARG, COPYs it or sets PIP_CERT/REQUESTS_CA_BUNDLE in the image (tests/test_docker_engine.py
    checks a built image for it)."""
    for dockerfile in LINTED:
        text = dockerfile.read_text()
        for line in text.splitlines():
            if re.match(r"\s*(ARG|ENV|COPY|ADD)\b", line):
                assert not re.search(r"(?i)cert|ca[-_]?bundle|pip_ca|\.crt", line), line
        installs = len(re.findall(r"pip install", text))
        assert len(re.findall(r"--mount=type=secret,id=pip_ca", text)) == installs, dockerfile


def test_stack_has_every_airflow_3_component_on_celery(compose):
    services = compose["services"]
    assert AIRFLOW_SERVICES | {"postgres", "redis"} <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
        "http://airflow-apiserver:8080/execution/")
    commands = {name: services[name]["command"] for name in
                ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer")}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor",
                        "airflow-triggerer": "triggerer"}
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully"


def test_workers_split_queues_and_only_the_gpu_worker_reserves_gpus(compose):
    services = compose["services"]
    cpu, gpu = services["airflow-worker"], services["airflow-worker-gpu"]
    assert cpu["command"][cpu["command"].index("--queues") + 1] == "default"
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    assert "deploy" not in cpu
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == "${AIRGPU_GPU_COUNT:-1}"
    text = COMPOSE.read_text()
    assert "device_ids:" in text and "CUDA_VISIBLE_DEVICES" in text  # documented variants
    assert gpu["environment"]["AIRGPU_OUTPUT_DIR"] == "/opt/airflow/outputs"


def test_init_creates_the_gpu_pool_with_one_slot_per_reserved_gpu(compose):
    script = " ".join(compose["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in script
    assert 'airflow pools set gpu "${AIRGPU_GPU_COUNT:-1}"' in script


def test_dags_and_outputs_are_mounted_where_the_compose_target_expects(compose):
    for name in AIRFLOW_SERVICES:
        volumes = compose["services"][name]["volumes"]
        assert "../dags:/opt/airflow/dags" in volumes
        assert "airgpu-outputs:/opt/airflow/outputs" in volumes
    assert "airgpu-outputs" in compose["volumes"]


def test_monitoring_profile_adds_dcgm_exporter_and_prometheus_only_on_request(compose):
    services = compose["services"]
    for name in ("dcgm-exporter", "prometheus"):
        assert services[name]["profiles"] == ["monitoring"]
    assert "dcgm-exporter" in services["dcgm-exporter"]["image"]
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["dcgm-exporter:9400"]
    for name, service in services.items():
        assert "profiles" not in service or name in ("dcgm-exporter", "prometheus")


def test_ports_bind_to_loopback_and_nothing_is_privileged(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        assert not service.get("privileged"), name
        assert service.get("network_mode") != "host", name


def test_secrets_come_from_env_and_the_example_ships_no_real_values():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD",
            "REDIS_PASSWORD"} <= required
    example = dict(line.split("=", 1) for line in
                   (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example)
    for name in required:
        assert example[name].startswith("CHANGE-ME"), name
    assert not re.search(r"(?i)(password|secret|key)\s*[:=]\s*[A-Za-z0-9+/]{16,}", text)
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
