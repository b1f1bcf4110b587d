# airgpu-nb GPU check: proves the GPUs this run asked for are visible to TensorFlow and can
# execute work, before any training starts. It needs only the standard library, TensorFlow and,
# when installed, nvidia-ml-py, so it runs in any TensorFlow image that has papermill.
import os
import time

REPORT_MIME = "application/vnd.airgpu.gpu-report+json"
HIDING_VALUES = ("", "-1", "none", "nodevfiles", "void")


class GpuCheckError(RuntimeError):
    """Fewer GPUs are usable than the run asked for."""


def nvml_inventory():
    """Devices as the NVIDIA driver sees them, or None when NVML is absent."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        devices = [_nvml_device(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        return {
            "driver_version": _text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()),
            "devices": devices,
        }
    finally:
        pynvml.nvmlShutdown()


def _nvml_device(pynvml, index):
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    device = {
        "index": index,
        "name": _text(pynvml.nvmlDeviceGetName(handle)),
        "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
        "memory_total_mb": memory.total // 2**20,
        "memory_used_mb": memory.used // 2**20,
        "utilization_pct": None,
        "mig_mode": None,
        "mig_devices": [],
    }
    try:
        device["utilization_pct"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except pynvml.NVMLError:
        pass  # not supported on MIG-enabled GPUs
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        device["mig_mode"] = bool(current)
    except pynvml.NVMLError:
        return device
    if device["mig_mode"]:
        for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except pynvml.NVMLError:
                continue
            device["mig_devices"].append({
                "uuid": _text(pynvml.nvmlDeviceGetUUID(mig)),
                "memory_total_mb": pynvml.nvmlDeviceGetMemoryInfo(mig).total // 2**20,
            })
    return device


def tensorflow_view(memory_growth=True):
    """TensorFlow's build and the GPUs it can see; turns memory growth on before first use."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        return {"version": None, "built_with_cuda": False, "gpus": [], "error": str(exc)}
    gpus = tf.config.list_physical_devices("GPU")
    growth = []
    for gpu in gpus if memory_growth else ():
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
            growth.append(gpu.name)
        except RuntimeError:
            pass  # TensorFlow already initialised its GPUs in this kernel: nothing to change
    build = tf.sysconfig.get_build_info()
    return {
        "version": tf.__version__,
        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "gpus": [gpu.name for gpu in gpus],
        "memory_growth": growth,
    }


def smoke_test(devices):
    """Run one small matrix product on each device, to prove work really executes there."""
    import tensorflow as tf

    results = []
    for device in devices:
        start = time.perf_counter()
        try:
            with tf.device(device):
                x = tf.random.uniform((128, 128))
                float(tf.reduce_sum(tf.matmul(x, x)))
            results.append({"device": device, "ok": True,
                            "ms": round((time.perf_counter() - start) * 1000, 2)})
        except Exception as exc:
            results.append({"device": device, "ok": False, "error": str(exc).splitlines()[0]})
    return results


def likely_cause(report):
    """Name the most probable reason TensorFlow sees fewer GPUs than requested."""
    visible = report["cuda_visible_devices"]
    tf_view = report["tensorflow"]
    nvml = report["nvml"]
    if tf_view.get("version") is None:
        return "TensorFlow is not installed in this kernel's environment."
    if visible is not None and visible.strip().lower() in HIDING_VALUES:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process."
    if not tf_view["built_with_cuda"]:
        return (f"TensorFlow {tf_view['version']} was built without CUDA (a CPU-only build such "
                "as tensorflow-cpu); install tensorflow[and-cuda] or use a GPU image.")
    if nvml is None:
        if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
            return ("no NVIDIA driver or device is visible in this container: run it with a GPU "
                    "device request (docker --gpus, compose deploy.resources.reservations, or a "
                    "pod resource limit for nvidia.com/gpu) and the NVIDIA container toolkit.")
        return "NVIDIA devices exist but NVML cannot load: the driver libraries are not mounted."
    mig_devices = [m["uuid"] for d in nvml["devices"] if d["mig_mode"] for m in d["mig_devices"]]
    if mig_devices and not (visible or "").startswith("MIG-"):
        return ("the GPU is in MIG mode and no MIG slice is addressable: set "
                f"CUDA_VISIBLE_DEVICES to a MIG device UUID such as {mig_devices[0]}.")
    if visible:
        return (f"CUDA_VISIBLE_DEVICES={visible!r} exposes fewer GPUs than requested "
                f"(the driver sees {len(nvml['devices'])}).")
    if len(nvml["devices"]) < max(1, _as_count(report["gpus_requested"])):
        return f"the driver sees only {len(nvml['devices'])} GPU(s) on this machine."
    return ("the driver sees the GPUs but TensorFlow cannot use them: the CUDA/cuDNN libraries in "
            "this image do not match the driver "
            f"(driver CUDA {nvml['cuda_driver_version']}, TensorFlow built for CUDA "
            f"{tf_view.get('cuda_version')}).")


def gpu_report(gpus_requested=1, allow_cpu=False, memory_growth=True, run_ops=True):
    """Everything this process can tell about its GPUs, with a verdict in ``ok``."""
    report = {
        "ok": False,
        "gpus_requested": gpus_requested,
        "allow_cpu": bool(allow_cpu),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvml": nvml_inventory(),
        "tensorflow": tensorflow_view(memory_growth),
        "ops": [],
        "cause": None,
        "message": "",
    }
    visible = report["tensorflow"]["gpus"]
    wanted = len(visible) if gpus_requested == "all" else _as_count(gpus_requested)
    needed = max(1, wanted) if gpus_requested == "all" else wanted
    use = [name.replace("/physical_device:", "/") for name in visible[:wanted]]
    if run_ops and report["tensorflow"]["version"] is not None:
        report["ops"] = smoke_test(use or ["/CPU:0"])
    ops_ok = all(op["ok"] for op in report["ops"])
    if len(visible) >= needed and ops_ok:
        report["ok"] = True
        report["message"] = (f"{len(use)} GPU(s) in use: {', '.join(use)}" if use
                             else "no GPU requested: running on CPU")
    elif allow_cpu and ops_ok:
        report["ok"] = True
        report["cause"] = likely_cause(report)
        report["message"] = (f"no GPU — running on CPU because --allow-cpu is set "
                             f"({len(visible)} of {needed} requested GPU(s) visible)")
    else:
        failed = [op for op in report["ops"] if not op["ok"]]
        report["cause"] = (f"work failed on {failed[0]['device']}: {failed[0]['error']}"
                           if failed and len(visible) >= needed else likely_cause(report))
        report["message"] = (f"GPU check failed: {len(visible)} of {needed} requested GPU(s) "
                             f"usable. Likely cause: {report['cause']}")
    return report


def render_text(report):
    """A short table a person can read in the executed notebook or a task log."""
    tf_view = report["tensorflow"]
    nvml = report["nvml"]
    lines = [
        f"airgpu GPU check: {'OK' if report['ok'] else 'FAILED'} — {report['message']}",
        f"  requested GPUs        {report['gpus_requested']} (allow_cpu={report['allow_cpu']})",
        f"  CUDA_VISIBLE_DEVICES  {report['cuda_visible_devices']}",
        f"  TensorFlow            {tf_view.get('version')} (built with CUDA: "
        f"{tf_view.get('built_with_cuda')}, CUDA {tf_view.get('cuda_version')}, "
        f"cuDNN {tf_view.get('cudnn_version')})",
        f"  TensorFlow GPUs       {', '.join(tf_view.get('gpus') or []) or 'none'}",
    ]
    if nvml is None:
        lines.append("  NVML                  not available (no NVIDIA driver or nvidia-ml-py)")
    else:
        lines.append(f"  NVIDIA driver         {nvml['driver_version']} "
                     f"(CUDA {nvml['cuda_driver_version']})")
        for d in nvml["devices"]:
            lines.append(f"  GPU {d['index']}                 {d['name']} {d['uuid']} "
                         f"{d['memory_used_mb']}/{d['memory_total_mb']} MiB"
                         f"{' MIG' if d['mig_mode'] else ''}")
    for op in report["ops"]:
        lines.append(f"  test op on {op['device']:<10} "
                     + (f"ok in {op['ms']} ms" if op["ok"] else f"FAILED: {op['error']}"))
    return "\n".join(lines)


def verify_gpus(gpus_requested=1, allow_cpu=False):
    """The injected cell's entry point: show the report, then fail fast if it is not ok."""
    report = gpu_report(gpus_requested, allow_cpu)
    text = render_text(report)
    try:
        from IPython.display import display
        display({REPORT_MIME: report, "text/plain": text}, raw=True)
    except ImportError:
        print(text)
    if not report["ok"]:
        raise GpuCheckError(report["message"])
    return report


def _as_count(value):
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 1


def _cuda_version(number):
    return f"{number // 1000}.{number % 1000 // 10}"


def _text(value):
    return value.decode() if isinstance(value, bytes) else value

