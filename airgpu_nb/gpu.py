"""The GPU probe behind `status` and `verify`; the same code the injected cell runs."""

from __future__ import annotations

import os
from typing import Any

from . import gpu_check


def status(include_tensorflow: bool = True) -> dict[str, Any]:
    """NVML's devices, TensorFlow's view and CUDA_VISIBLE_DEVICES, changing nothing."""
    tf_view = gpu_check.tensorflow_view(memory_growth=False) if include_tensorflow else None
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvml": gpu_check.nvml_inventory(),
        "tensorflow": tf_view,
    }


def render_status(info: dict[str, Any]) -> str:
    nvml = info["nvml"]
    lines = [f"CUDA_VISIBLE_DEVICES: {info['cuda_visible_devices']}"]
    if nvml is None:
        lines.append("NVML: not available (no NVIDIA driver here, or nvidia-ml-py missing)")
    else:
        lines.append(f"NVIDIA driver {nvml['driver_version']} (CUDA {nvml['cuda_driver_version']}),"
                     f" {len(nvml['devices'])} GPU(s)")
        for d in nvml["devices"]:
            util = "n/a" if d["utilization_pct"] is None else f"{d['utilization_pct']}%"
            lines.append(f"  [{d['index']}] {d['name']}  {d['uuid']}  "
                         f"{d['memory_used_mb']}/{d['memory_total_mb']} MiB  util {util}"
                         f"{'  MIG on' if d['mig_mode'] else ''}")
            lines.extend(f"      MIG {m['uuid']} {m['memory_total_mb']} MiB"
                         for m in d["mig_devices"])
    tf_view = info["tensorflow"]
    if tf_view is not None:
        if tf_view["version"] is None:
            lines.append("TensorFlow: not installed")
        else:
            lines.append(f"TensorFlow {tf_view['version']} (built with CUDA: "
                         f"{tf_view['built_with_cuda']}), GPUs visible: "
                         f"{', '.join(tf_view['gpus']) or 'none'}")
    return "\n".join(lines)


def verify(gpus: int | str = 1, allow_cpu: bool = False) -> dict[str, Any]:
    """The injected cell's check, run in this process; the report says ``ok`` or why not."""
    return gpu_check.gpu_report(gpus, allow_cpu)
