"""Build docker/'s images: `make images` runs this, and so do the tests that drive a real engine.

    python scripts/docker_images.py [--only runtime,airflow,gpu-worker] [--local-base auto|yes|no]

Where the official bases (tensorflow/tensorflow, apache/airflow) can be pulled, the images are
built on them, as on a GPU box. Where they cannot (CI, this project's machines), a local Debian
base is made first: `debootstrap --variant=minbase bookworm` -> `docker import` ->
docker/Dockerfile.base, and the images are built on it with `--build-arg BASE_IMAGE=...`
(TensorFlow then comes from pip as tensorflow-cpu).

A TLS-intercepting proxy's CA (the host bundle, $AIRGPU_BUILD_CA or
/etc/ssl/certs/ca-certificates.crt) reaches pip only as the BuildKit secret `pip_ca`, never a
layer or a build arg. Only images named `airgpu-nb-*` are created or replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
VERSION = "0.1.0"
DEBIAN_IMAGE = "airgpu-nb-debian:bookworm"
BASE_PYTHON = "airgpu-nb-base-python:bookworm"
BASE_AIRFLOW = "airgpu-nb-base-airflow:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCAL_TF = "tensorflow-cpu==2.21.0"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"

AIRFLOW = f"airgpu-nb-airflow:{VERSION}"

# name -> (Dockerfile, tag, official base, local base, TF_REQUIREMENT on the local base).
# On the local base the GPU worker is the Airflow image plus TensorFlow: the same Airflow as the
# rest of the stack, and one Airflow install to build instead of two.
IMAGES: dict[str, tuple[str, str, str, str, str | None]] = {
    "runtime": ("Dockerfile.runtime", f"airgpu-nb-runtime:{VERSION}",
                "tensorflow/tensorflow:2.21.0-gpu", BASE_PYTHON, LOCAL_TF),
    "airflow": ("Dockerfile.airflow", AIRFLOW,
                "apache/airflow:3.3.2-python3.11", BASE_AIRFLOW, None),
    "gpu-worker": ("Dockerfile.gpu-worker", f"airgpu-nb-gpu-worker:{VERSION}",
                   "apache/airflow:3.3.2-python3.11", AIRFLOW, LOCAL_TF),
}
# Test-only stand-ins for the official postgres and redis images (tests/compose/compose.test.yml):
# name -> (Dockerfile under the repository root, --target, tag).
SERVICES: dict[str, tuple[str, str, str]] = {
    "postgres": ("tests/compose/Dockerfile.services", "postgres",
                 "airgpu-nb-test-postgres:bookworm"),
    "redis": ("tests/compose/Dockerfile.services", "redis", "airgpu-nb-test-redis:bookworm"),
}


class BuildError(RuntimeError):
    """A step failed; the message is one line saying which and how to fix it."""


def say(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def docker_client() -> str:
    """A docker CLI that can build with BuildKit (needed for `--secret`): one with the buildx
    plugin, or a client older than 23 (BuildKit built in), such as Debian's docker.io."""
    candidates = [shutil.which("docker"), "/usr/bin/docker"]
    for cli in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if _ok([cli, "buildx", "version"]):
            return cli
        version = _output([cli, "version", "--format", "{{.Client.Version}}"]).strip()
        major = version.split(".", 1)[0]
        if major.isdigit() and int(major) < 23:
            return cli
    raise BuildError("no docker client can build with BuildKit: install the buildx plugin "
                     "(docker-buildx) or Debian's docker.io")


def daemon_answers(cli: str = "docker") -> bool:
    return _ok([cli, "info", "--format", "{{.ServerVersion}}"], timeout=20)


@contextlib.contextmanager
def running_daemon(log_path: str | Path = "/var/log/airgpu-nb-dockerd.log",
                   pidfile: str | Path = "/var/run/airgpu-nb-dockerd.pid") -> Iterator[bool]:
    """A Docker daemon that answers for the duration: the one running (yields False), or
    `dockerd` started here as root and stopped on exit (yields True). For the tests and the
    benchmarks; `make images` expects the host's own daemon."""
    if daemon_answers():
        yield False
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        raise BuildError("no Docker daemon answers, and starting dockerd needs root and "
                         "Debian's docker.io (`make sysdeps`)")
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(["dockerd", "--pidfile", str(pidfile)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not daemon_answers():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise BuildError(f"dockerd did not start: see {log_path}")
                time.sleep(0.5)
            yield True
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)


def image_exists(cli: str, ref: str) -> bool:
    return _ok([cli, "image", "inspect", "--format", "{{.Id}}", ref])


def can_use_official(cli: str, ref: str) -> bool:
    """The official base is here already, or can be pulled now."""
    if image_exists(cli, ref):
        return True
    say(f"pulling {ref} ...")
    return _ok([cli, "pull", "--quiet", ref], timeout=1800)


def build_debian(cli: str, rebuild: bool = False) -> None:
    """debootstrap a minimal bookworm and import it as DEBIAN_IMAGE (about 30 s)."""
    if image_exists(cli, DEBIAN_IMAGE) and not rebuild:
        return
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is missing: `make sysdeps` (or apt-get install "
                         "debootstrap) installs it")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="airgpu-nb-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
             "debootstrap", quiet=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run([cli, "import", "--change", 'CMD ["/bin/bash"]', "-", DEBIAN_IMAGE],
                 "docker import", stdin=tar.stdout, quiet=True)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
    say(f"{DEBIAN_IMAGE} imported in {time.monotonic() - started:.0f} s")


def build(cli: str, dockerfile: str, tag: str, args: dict[str, str],
          target: str | None = None, ca: str | None = None) -> float:
    """One `docker build` from the repository root (`dockerfile` relative to docker/, or to the
    root when it has a folder); returns its seconds."""
    path = ROOT / dockerfile if "/" in dockerfile else DOCKER_DIR / dockerfile
    command = [cli, "build", "--file", str(path), "--tag", tag]
    if ca:
        command += ["--secret", f"id=pip_ca,src={ca}"]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    if target:
        command += ["--target", target]
    previous = _output([cli, "image", "inspect", "--format", "{{.Id}}", tag]).strip()
    started = time.monotonic()
    _run([*command, str(ROOT)], f"building {tag}",
         env={**os.environ, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"})
    seconds = time.monotonic() - started
    if previous and previous != _output([cli, "image", "inspect", "--format", "{{.Id}}",
                                         tag]).strip():
        _ok([cli, "image", "rm", previous])  # our own image, now untagged; fails if in use
    say(f"{tag} built in {seconds:.0f} s")
    return seconds


def build_images(names: Sequence[str], local_base: str = "auto",
                 ca: str | None = None) -> dict[str, float]:
    """Build the named images; returns seconds per image (local bases included)."""
    cli = docker_client()
    if not daemon_answers(cli):
        raise BuildError("no Docker daemon answers: start dockerd (`sudo dockerd &` or "
                         "`sudo systemctl start docker`)")
    ca = build_ca(ca)
    times: dict[str, float] = {}

    def build_one(name: str) -> None:
        dockerfile, tag, official, local, local_tf = IMAGES[name]
        if tag in times:
            return
        args: dict[str, str] = {}
        if local_base == "yes" or (local_base == "auto"
                                   and not can_use_official(cli, official)):
            # The local base is another of these images (the GPU worker's is the Airflow
            # image): built first when asked for too, or when it is missing.
            other = next((n for n, spec in IMAGES.items() if spec[1] == local), None)
            if other is not None:
                if other in names or not image_exists(cli, local):
                    build_one(other)
            elif local not in times:  # always: the layer cache makes an unchanged base instant
                build_debian(cli)
                times[local] = build(cli, "Dockerfile.base", local,
                                     {"DEBIAN_IMAGE": DEBIAN_IMAGE},
                                     target=local.split("-base-")[1].split(":")[0], ca=ca)
            args["BASE_IMAGE"] = local
            if local_tf:
                args["TF_REQUIREMENT"] = local_tf
            say(f"{tag}: on the local base {local} (official {official} not available)")
        times[tag] = build(cli, dockerfile, tag, args, ca=ca)

    for name in names:
        build_one(name)
    return times


def build_services(ca: str | None = None) -> dict[str, float]:
    """The test stack's PostgreSQL and Redis stand-ins, on the local Debian base."""
    cli = docker_client()
    ca = build_ca(ca)
    build_debian(cli)
    return {tag: build(cli, dockerfile, tag, {"DEBIAN_IMAGE": DEBIAN_IMAGE}, target=target,
                       ca=ca)
            for dockerfile, target, tag in SERVICES.values()}


def build_ca(ca: str | None = None) -> str | None:
    """The CA bundle pip gets as the `pip_ca` secret: `ca`, else $AIRGPU_BUILD_CA, else the
    host's bundle; None when that file does not exist."""
    ca = ca if ca is not None else os.environ.get("AIRGPU_BUILD_CA", HOST_CA)
    return ca if ca and Path(ca).is_file() else None


def _ok(command: Sequence[str], timeout: float = 60) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _output(command: Sequence[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _run(command: Sequence[str], what: str, quiet: bool = False, **kwargs: object) -> None:
    result = subprocess.run(command, capture_output=quiet, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise BuildError(f"{what} failed (exit {result.returncode})"
                         + (f": {tail[0]}" if tail else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/docker_images.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(IMAGES),
                        help="comma-separated images to build (default: all three)")
    parser.add_argument("--local-base", choices=("auto", "yes", "no"), default="auto",
                        help="build on the local Debian base: when the official one cannot be "
                             "pulled (auto), always, or never")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(IMAGES))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; choose from {', '.join(IMAGES)}")
    try:
        times = build_images(names, args.local_base)
    except BuildError as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 2
    for tag, seconds in times.items():
        print(f"{tag}\t{seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
