# airgpu-nb GPU check: proves the GPUs this run asked for are visible to TensorFlow and can
# execute work, before any training starts. It needs only the standard library, TensorFlow and,
# when installed, nvidia-ml-py, so it runs in any TensorFlow image that has papermill.
#
# TensorFlow is probed in a child process started with this kernel's own interpreter and
# environment (CUDA_VISIBLE_DEVICES included), so the kernel's TensorFlow is not initialised here:
# the notebook can still choose its devices, virtual devices, memory limits or threads itself,
# and a notebook that never imports TensorFlow does not pay for its import. Only a notebook that
# imports TensorFlow and configures none of that is probed in the kernel (`probe_in_kernel`,
# decided at promotion), sharing the import it would pay anyway.
import json
import os
import signal
import subprocess
import sys
import time

REPORT_MIME = "application/vnd.airgpu.gpu-report+json"
HIDING_VALUES = ("", "-1", "none", "nodevfiles", "void")
NOT_INSTALLED = "TensorFlow is not installed in this kernel's environment."
GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"
PROBE_MARKER = "@@airgpu-probe@@ "
PROBE_TIMEOUT_S = 300.0

# Runs in the child: `python -c PROBE_SOURCE '{"marker": ..., "ops": null | "all" | N}'`.
# It reports on stdout, one marker line per finding, flushed as it goes, so that a crash or a
# timeout still leaves what was learnt before it; everything else TensorFlow prints is ignored.
# The same `probe()` runs in the kernel itself when the promotion found that the notebook imports
# TensorFlow and never configures its devices (`in_kernel`): then the import is shared.
PROBE_SOURCE = r'''
import json, os, sys, time


def first_line(exc):
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def probe(ops, say):
    try:
        import tensorflow as tf
    except ImportError as exc:
        missing = (isinstance(exc, ModuleNotFoundError)
                   and (exc.name or "").split(".")[0] == "tensorflow")
        say({"tensorflow": {"version": None, "built_with_cuda": False, "gpus": [],
                            "error": None if missing else
                            "TensorFlow cannot be imported in this kernel's environment: "
                            + first_line(exc)}})
        say({"done": True})
        return
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    build = tf.sysconfig.get_build_info()
    say({"tensorflow": {"version": tf.__version__,
                        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
                        "cuda_version": build.get("cuda_version"),
                        "cudnn_version": build.get("cudnn_version"),
                        "gpus": gpus}})
    if ops is not None:
        chosen = gpus if ops == "all" else gpus[:ops]
        for device in [g.replace("/physical_device:", "/") for g in chosen] or ["/CPU:0"]:
            say({"running": device})
            start = time.perf_counter()
            try:
                with tf.device(device):
                    x = tf.random.uniform((128, 128))
                    y = tf.matmul(x, x)
                    float(tf.reduce_sum(y))
                # eager placement is soft: prove the product really ran where it was asked to
                wanted = "device:" + device.rsplit("/", 1)[-1]
                if not y.device.upper().endswith(wanted.upper()):
                    raise RuntimeError("the product ran on " + y.device + " instead")
                say({"op": {"device": device, "ok": True,
                            "ms": round((time.perf_counter() - start) * 1000, 2)}})
            except Exception as exc:
                say({"op": {"device": device, "ok": False, "error": first_line(exc)}})
    say({"done": True})


if __name__ == "__main__":
    args = json.loads(sys.argv[1])

    def say(item):
        sys.stdout.write("\n" + args["marker"] + json.dumps(item) + "\n")
        sys.stdout.flush()

    probe(args["ops"], say)
    os._exit(0)  # the report is out; TensorFlow's teardown at exit would cost most of a second
'''


class GpuCheckError(RuntimeError):
    """Fewer GPUs are usable than the run asked for."""


class MissingPackageError(RuntimeError):
    """The run environment lacks a package the notebook imports."""


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


def enable_memory_growth():
    """Ask this process's TensorFlow to grow GPU memory on demand, without touching TensorFlow.

    TensorFlow reads TF_FORCE_GPU_ALLOW_GROWTH when it initialises its GPUs, so setting the
    variable is enough while TensorFlow is not imported here; a value the environment already
    set is kept. Returns what was done, in words.
    """
    if "tensorflow" in sys.modules:
        current = os.environ.get(GROWTH_ENV)
        return ("unchanged: TensorFlow was already imported in this kernel ("
                + GROWTH_ENV + "=" + repr(current) + ")")
    value = os.environ.setdefault(GROWTH_ENV, "true")
    if value.strip().lower() == "true":
        return "on: " + GROWTH_ENV + "=true for this kernel's TensorFlow"
    return "left as the environment set it: " + GROWTH_ENV + "=" + repr(value)


def probe_tensorflow(ops=None, timeout=PROBE_TIMEOUT_S, in_kernel=False):
    """TensorFlow's view from a child process: ``{"tensorflow": view, "ops": [...], "probe": ...}``.

    ``ops`` is None (no test work), "all" (every visible GPU) or how many GPUs to run a small
    matrix product on (the CPU when none is visible). A child that cannot start, crashes or runs
    past ``timeout`` seconds is reported in one line, never as a traceback. ``in_kernel`` runs
    the same probe in this process instead (TensorFlow's import is then the notebook's own).
    """
    if in_kernel:
        return _probe_here(ops)
    env = dict(os.environ)
    env.setdefault(GROWTH_ENV, "true")  # the child never holds a whole GPU while it tests it
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-c", PROBE_SOURCE,
               json.dumps({"marker": PROBE_MARKER, "ops": ops})]
    start = time.perf_counter()
    failure = None
    try:
        child = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, timeout=timeout)
        out, err, code = child.stdout, child.stderr, child.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = exc.stdout or b"", exc.stderr or b"", None
        failure = ("the TensorFlow probe process ran past its " + format(timeout, "g")
                   + " s timeout and was stopped")
    except (OSError, ValueError) as exc:
        out, err, code = b"", b"", None
        failure = ("the TensorFlow probe process could not start (" + repr(sys.executable)
                   + "): " + _first_line(str(exc)))
    items = []
    for line in out.decode("utf-8", "replace").splitlines():
        at = line.find(PROBE_MARKER)
        if at < 0:
            continue
        try:
            items.append(json.loads(line[at + len(PROBE_MARKER):]))
        except ValueError:
            continue
    return _collate(items, failure, lambda: _crash(code, err), code, start, "child process")


def _probe_here(ops):
    """``probe()`` of PROBE_SOURCE in this process; an exception is one line, as for a child."""
    namespace = {"__name__": "airgpu_probe"}
    exec(compile(PROBE_SOURCE, "<airgpu probe>", "exec"), namespace)
    items, failure, start = [], None, time.perf_counter()
    try:
        namespace["probe"](ops, items.append)
    except Exception as exc:  # TensorFlow's own failures are reported, never raised
        failure = "the TensorFlow probe failed: " + _first_line(str(exc))
    return _collate(items, failure, lambda: "the TensorFlow probe gave no report", None, start,
                    "kernel")


def _collate(items, failure, crash, code, start, where):
    found = {"tensorflow": None, "ops": [], "running": None, "done": False}
    for item in items:
        if not isinstance(item, dict):
            continue
        if "op" in item:
            found["ops"].append(item["op"])
            found["running"] = None
        else:
            found.update(item)
    if failure is None and not found["done"]:
        failure = crash()
    tf_view = found["tensorflow"]
    if tf_view is None:
        tf_view = {"version": None, "built_with_cuda": False, "gpus": [],
                   "error": failure or "the TensorFlow probe process gave no report"}
    elif tf_view["version"] is None and not tf_view.get("error"):
        tf_view["error"] = NOT_INSTALLED
    if found["running"] and failure:
        found["ops"].append({"device": found["running"], "ok": False, "error": failure})
    return {
        "tensorflow": tf_view,
        "ops": found["ops"],
        "probe": {"seconds": round(time.perf_counter() - start, 2), "exit_code": code,
                  "error": failure, "where": where},
    }


def tensorflow_view(memory_growth=True, timeout=PROBE_TIMEOUT_S):
    """TensorFlow's build and the GPUs it can see, from a child process.

    With ``memory_growth`` this kernel's TensorFlow is told to grow GPU memory on demand (only
    while it is not imported yet); the view says what was done.
    """
    growth = enable_memory_growth() if memory_growth else None
    view = probe_tensorflow(None, timeout)["tensorflow"]
    view["memory_growth"] = growth
    return view


def likely_cause(report):
    """Name the most probable reason TensorFlow sees fewer GPUs than requested."""
    visible = report["cuda_visible_devices"]
    tf_view = report["tensorflow"]
    nvml = report["nvml"]
    if tf_view.get("version") is None:
        return tf_view.get("error") or NOT_INSTALLED
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


def gpu_report(gpus_requested=1, allow_cpu=False, memory_growth=True, run_ops=True,
               timeout=PROBE_TIMEOUT_S, in_kernel=False):
    """Everything this process can tell about its GPUs, with a verdict in ``ok``.

    TensorFlow is asked in a child process, or here ``in_kernel`` (see ``probe_tensorflow``);
    NVML is read here.
    """
    growth = enable_memory_growth() if memory_growth else None
    wanted = "all" if gpus_requested == "all" else _as_count(gpus_requested)
    probe = probe_tensorflow(wanted if run_ops else None, timeout, in_kernel)
    probe["tensorflow"]["memory_growth"] = growth
    report = {
        "ok": False,
        "gpus_requested": gpus_requested,
        "allow_cpu": bool(allow_cpu),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvml": nvml_inventory(),
        "tensorflow": probe["tensorflow"],
        "ops": probe["ops"],
        "probe": probe["probe"],
        "cause": None,
        "message": "",
    }
    visible = report["tensorflow"]["gpus"]
    needed = max(1, len(visible)) if wanted == "all" else wanted
    chosen = visible if wanted == "all" else visible[:wanted]
    use = [name.replace("/physical_device:", "/") for name in chosen]
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
                           if failed and (len(visible) >= needed or allow_cpu)
                           else likely_cause(report))
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
    if tf_view.get("memory_growth"):
        lines.append(f"  memory growth         {tf_view['memory_growth']}")
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
    probe = report.get("probe")
    if probe:
        lines.append(f"  probed in             a child process, {probe['seconds']} s"
                     + (f" ({probe['error']})" if probe.get("error") else ""))
    packages = report.get("packages")
    if packages and packages["checked"]:
        lines.append(f"  packages              {packages['checked']} checked: "
                     + (packages["message"] or "all importable"))
    return "\n".join(lines)


def check_packages(expected=(), allow_missing=False):
    """Whether each package the notebook was prototyped with is importable here, without
    importing it: ``expected`` holds ``[module, distribution, version]`` items recorded at
    promotion. Missing ones fail the check unless ``allow_missing``; a different major version
    is reported, never a failure."""
    import importlib.metadata
    import importlib.util

    missing, different = [], []
    for module, distribution, version in expected:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        name = distribution or module
        if not found:
            missing.append({"module": module, "distribution": distribution,
                            "prototyped": version})
            continue
        here = None
        for candidate in (distribution, module):
            if candidate and here is None:
                try:
                    here = importlib.metadata.version(candidate)
                except (importlib.metadata.PackageNotFoundError, ValueError):
                    pass
        if version and here and _major(version) != _major(here):
            different.append({"distribution": name, "prototyped": version, "found": here})
    ok = not missing or bool(allow_missing)
    message = ""
    if missing:
        lacks = ", ".join(_lacking(m) for m in missing)
        them = "it" if len(missing) == 1 else "them"
        message = f"the worker lacks {lacks}: add {them} to the runtime image" + (
            " (running anyway: --allow-missing-packages)" if allow_missing
            else " or promote with --allow-missing-packages")
    if different:
        message += ("; " if message else "") + "major version differs: " + ", ".join(
            f"{d['distribution']} {d['found']} here, prototyped with {d['prototyped']}"
            for d in different)
    return {"ok": ok, "checked": len(expected), "missing": missing, "different": different,
            "allow_missing": bool(allow_missing), "message": message}


def _lacking(item):
    name = item["distribution"] or item["module"]
    if item["prototyped"]:
        return f"{name}; prototyped with {item['prototyped']}"
    return f"{name} (not installed where it was promoted either)"


def _major(version):
    return str(version).split(".")[0]


def verify_gpus(gpus_requested=1, allow_cpu=False, packages=(), allow_missing_packages=False,
                probe_in_kernel=False):
    """The injected cell's entry point: show the report, then fail fast if it is not ok.

    ``packages`` (recorded at promotion) are checked first and cheaply; the report always
    carries the result under ``packages``.
    """
    checked = check_packages(packages, allow_missing_packages)
    report = gpu_report(gpus_requested, allow_cpu, in_kernel=probe_in_kernel)
    report["packages"] = checked
    gpus_ok = report["ok"]
    report["ok"] = gpus_ok and checked["ok"]
    text = render_text(report)
    try:
        from IPython.display import display
        display({REPORT_MIME: report, "text/plain": text}, raw=True)
    except ImportError:
        print(text)
    if not gpus_ok:
        raise GpuCheckError(report["message"])
    if not checked["ok"]:
        raise MissingPackageError(checked["message"])
    return report


def _crash(code, err):
    """One line for a probe process that ended without its report."""
    if code is not None and code < 0:
        try:
            how = "was killed by " + signal.Signals(-code).name
        except ValueError:
            how = "was killed by signal " + str(-code)
    else:
        how = "exited with code " + str(code) + " before its report"
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    return "the TensorFlow probe process " + how + (": " + lines[-1][:300] if lines else "")


def _first_line(text):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _as_count(value):
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 1


def _cuda_version(number):
    return f"{number // 1000}.{number % 1000 // 10}"


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
