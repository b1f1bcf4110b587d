"""The GPU probe behind `status` and `verify` (the same code the injected cell runs) and the
kernel's GPU selection behind `%airgpu use`.

No TensorFlow import at module level: selecting GPUs must happen before TensorFlow initialises.
"""

from __future__ import annotations

import html
import os
import sys
from typing import Any

from . import gpu_check
from .errors import AirgpuError


def status(include_tensorflow: bool = True) -> dict[str, Any]:
    """NVML's devices, TensorFlow's view and CUDA_VISIBLE_DEVICES, changing nothing."""
    tf_view = gpu_check.tensorflow_view(memory_growth=False) if include_tensorflow else None
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvml": gpu_check.nvml_inventory(),
        "tensorflow": tf_view,
    }


def render_status(info: dict[str, Any]) -> str:
    """``status()`` as plain text, for the terminal and the magics' text/plain."""
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


def status_html(info: dict[str, Any]) -> str:
    """``gpu.status()`` as tables; every absent piece is said in words, not left blank."""
    e = html.escape
    nvml = info["nvml"]
    out = ["<div class='airgpu-status'>"]
    if nvml is None:
        out.append("<p><b>No NVIDIA GPU visible:</b> NVML is not available (no NVIDIA driver "
                   "here, or nvidia-ml-py is missing).</p>")
    else:
        out.append(f"<p>NVIDIA driver {e(str(nvml['driver_version']))} (CUDA "
                   f"{e(str(nvml['cuda_driver_version']))}), {len(nvml['devices'])} GPU(s)</p>")
        rows = []
        for d in nvml["devices"]:
            util = "n/a" if d["utilization_pct"] is None else f"{d['utilization_pct']}%"
            mig = {True: "on", False: "off", None: "n/a"}[d["mig_mode"]]
            rows.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                d["index"], d["name"], d["uuid"],
                f"{d['memory_used_mb']} / {d['memory_total_mb']} MiB", util, mig)) + "</tr>")
            rows.extend(f"<tr><td></td><td>MIG slice</td><td>{e(m['uuid'])}</td>"
                        f"<td>{m['memory_total_mb']} MiB</td><td></td><td></td></tr>"
                        for m in d["mig_devices"])
        out.append("<table><thead><tr><th>index</th><th>name</th><th>UUID</th><th>memory used"
                   "/total</th><th>utilisation</th><th>MIG mode</th></tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table>")
    tf_view = info.get("tensorflow")
    if tf_view is None:
        out.append("<p>TensorFlow: not checked.</p>")
    elif tf_view["version"] is None:
        out.append("<p>TensorFlow: not installed in this kernel's environment.</p>")
    else:
        gpus = ", ".join(tf_view["gpus"]) or "none"
        out.append("<table><tbody>" + "".join(
            f"<tr><th style='text-align:left'>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in (
                ("TensorFlow", tf_view["version"]),
                ("built with CUDA", tf_view["built_with_cuda"]),
                ("CUDA / cuDNN", f"{tf_view.get('cuda_version') or 'n/a'} / "
                                 f"{tf_view.get('cudnn_version') or 'n/a'}"),
                ("GPUs TensorFlow sees", gpus))) + "</tbody></table>")
    visible = info["cuda_visible_devices"]
    out.append(f"<p>CUDA_VISIBLE_DEVICES: <code>{e(visible)}</code></p>" if visible is not None
               else "<p>CUDA_VISIBLE_DEVICES: not set (every GPU is visible)</p>")
    out.append("</div>")
    return "".join(out)


def verify(gpus: int | str = 1, allow_cpu: bool = False) -> dict[str, Any]:
    """The injected cell's check (TensorFlow probed in a child process); the report says
    ``ok`` or why not."""
    return gpu_check.gpu_report(gpus, allow_cpu)


# -- choosing this kernel's GPUs (`%airgpu use`) ----------------------------------------------

def tensorflow_initialised() -> bool:
    """Whether TensorFlow in this process has created its runtime context (devices fixed).

    ``list_physical_devices`` does not count: visible devices can still change after it.
    """
    if "tensorflow" not in sys.modules:
        return False
    try:
        from tensorflow.python.eager import context
    except ImportError:  # pragma: no cover - a TensorFlow without the eager module
        return False
    ctx = context.context()
    flag = getattr(ctx, "_initialized", None)
    return bool(flag) if flag is not None else getattr(ctx, "_context_handle", None) is not None


def use_gpus(ids: str, memory_growth: bool = False, memory_limit_mb: int | None = None) -> str:
    """Pick GPUs for this kernel. Only the environment changes unless TensorFlow is already
    imported or a memory limit needs its API, so TensorFlow is not imported needlessly."""
    wanted = [part.strip() for part in ids.split(",") if part.strip()]
    hide = [w.lower() for w in wanted] in (["none"], ["-1"])
    for part in [] if hide else wanted:
        if not (part.isdigit() or part.startswith(("GPU-", "MIG-"))):
            raise AirgpuError(f"invalid GPU id {part!r}: use indices (0,1), UUIDs (GPU-..., "
                              "MIG-...) or 'none'")
    if not wanted:
        raise AirgpuError("give GPU ids, e.g. %airgpu use 0 or %airgpu use 0,1")
    if memory_limit_mb is not None and memory_limit_mb <= 0:
        raise AirgpuError("--memory-limit takes a positive number of MiB")
    if tensorflow_initialised():
        raise AirgpuError("TensorFlow has already initialised its GPUs in this kernel; restart "
                          "the kernel and run %airgpu use before anything that uses TensorFlow")
    visible = "-1" if hide else ",".join(wanted)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if memory_growth:
        os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    else:
        os.environ.pop("TF_FORCE_GPU_ALLOW_GROWTH", None)
    said = f"CUDA_VISIBLE_DEVICES={visible}"
    if "tensorflow" not in sys.modules and memory_limit_mb is None:
        growth = "; memory growth on" if memory_growth else ""
        return f"{said}{growth} (TensorFlow not imported yet: it will start with these GPUs)"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    chosen = gpus
    if hide:
        chosen = []
    elif len(gpus) > len(wanted) and all(w.isdigit() for w in wanted):
        # CUDA was initialised before the variable changed, so it still lists every GPU.
        chosen = [gpus[int(w)] for w in wanted if int(w) < len(gpus)]
    tf.config.set_visible_devices(chosen, "GPU")
    for gpu in chosen:
        if memory_growth:
            tf.config.experimental.set_memory_growth(gpu, True)
        elif memory_limit_mb is not None:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=memory_limit_mb)])
    names = ", ".join(g.name for g in chosen) or "none (TensorFlow sees no GPU here)"
    extra = ("; memory growth on" if memory_growth else
             f"; memory limit {memory_limit_mb} MiB per GPU" if memory_limit_mb else "")
    return f"{said}; TensorFlow GPUs: {names}{extra}"
