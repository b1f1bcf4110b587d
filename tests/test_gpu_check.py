"""The GPU check on this CPU-only machine, and its diagnosis of why GPUs are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from airgpu_nb.cli import main
from airgpu_nb.gpu_check import gpu_report, likely_cause


def report(**overrides):
    base = {
        "gpus_requested": 1,
        "cuda_visible_devices": None,
        "tensorflow": {"version": "2.21.0", "built_with_cuda": True, "cuda_version": "12.5",
                       "gpus": []},
        "nvml": {"driver_version": "570.1", "cuda_driver_version": "12.8", "devices": [
            {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-1", "mig_mode": False,
             "mig_devices": []}]},
    }
    base.update(overrides)
    return base


def test_missing_gpu_fails_and_names_the_cpu_only_tensorflow_build():
    result = gpu_report(gpus_requested=1, allow_cpu=False)
    assert result["ok"] is False
    assert result["tensorflow"]["built_with_cuda"] is False
    assert "built without CUDA" in result["message"]
    assert result["ops"] and result["ops"][0]["device"] == "/CPU:0" and result["ops"][0]["ok"]


def test_allow_cpu_passes_and_says_so():
    result = gpu_report(gpus_requested=1, allow_cpu=True)
    assert result["ok"] is True
    assert "no GPU — running on CPU because --allow-cpu" in result["message"]


def test_zero_gpus_requested_is_a_cpu_run_not_a_failure():
    result = gpu_report(gpus_requested=0, allow_cpu=False)
    assert result["ok"] is True and "no GPU requested" in result["message"]


def test_report_has_the_contract_fields():
    result = gpu_report(gpus_requested="all", allow_cpu=True)
    assert {"ok", "gpus_requested", "tensorflow", "nvml", "cuda_visible_devices"} <= set(result)
    assert {"version", "built_with_cuda", "gpus"} <= set(result["tensorflow"])
    json.dumps(result)  # the MIME bundle must be JSON


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles"])
def test_cuda_visible_devices_hiding_gpus_is_named(visible):
    assert "hides every GPU" in likely_cause(report(cuda_visible_devices=visible))


def test_no_driver_in_the_container_is_named():
    cause = likely_cause(report(nvml=None))
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has NVIDIA device files")
    assert "no NVIDIA driver" in cause and "device request" in cause


def test_unaddressable_mig_slice_is_named_with_a_uuid_to_use():
    nvml = report()["nvml"]
    nvml["devices"][0].update(mig_mode=True, mig_devices=[{"uuid": "MIG-abc",
                                                           "memory_total_mb": 10000}])
    cause = likely_cause(report(nvml=nvml, cuda_visible_devices="GPU-1"))
    assert "MIG" in cause and "MIG-abc" in cause


def test_driver_and_library_mismatch_is_named():
    cause = likely_cause(report())
    assert "do not match the driver" in cause and "12.8" in cause


def test_fewer_gpus_exposed_than_requested_is_named():
    assert "exposes fewer GPUs" in likely_cause(report(cuda_visible_devices="0",
                                                       gpus_requested=2))


def test_verify_cli_exit_codes(capsys):
    assert main(["verify", "--gpus", "1", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["verify", "--gpus", "1", "--allow-cpu"]) == 0
    assert "airgpu GPU check: OK" in capsys.readouterr().out


def test_hidden_gpus_are_reported_from_a_fresh_process():
    code = ("from airgpu_nb.gpu_check import gpu_report; r = gpu_report(1, False, run_ops=False);"
            "print(r['cause'])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "CUDA_VISIBLE_DEVICES='-1' hides every GPU" in out.stdout
