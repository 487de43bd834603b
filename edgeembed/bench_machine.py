"""The machine a benchmark runs on: device profiles that limit it, and a record of it.

A device profile (``edgeembed/profiles.json``) names a board's CPU count, interpreter
threads and memory. `apply_profile` reproduces the limits on the current machine: it
pins the process to that many CPUs with ``os.sched_setaffinity`` and caps private memory
with ``RLIMIT_DATA``. Child processes inherit both.

``RLIMIT_DATA`` is used rather than ``RLIMIT_AS`` because address space counts every
memory-mapped file and every reserved thread stack. With ``RLIMIT_AS`` at 150 MiB the
LiteRT interpreter fails to import, and a memory-mapped 500 MB gallery index fails to
open, although both work on a board with that much free RAM. ``RLIMIT_DATA`` counts the
heap and private anonymous mappings, which is what runs out on a small board.
A profile does not reproduce an ARM core's speed, its memory bandwidth or page-cache
pressure.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROFILES_SCHEMA = "edgeembed.bench-profiles/1"

# The profiles file of a source checkout (an editable install finds it too).
DEFAULT_PROFILES = Path(__file__).resolve().parent / "profiles.json"

PACKAGES = ("numpy", "pillow", "annoy", "ai-edge-litert", "tflite-runtime", "tensorflow-cpu",
            "torch", "onnxruntime", "matplotlib")


class ProfileError(ValueError):
    """Raised when a profiles file is missing or invalid, or names no such profile."""


@dataclass(frozen=True)
class DeviceProfile:
    """Resource limits that stand in for one board.

    Attributes:
        name: The name given to ``--profile``.
        description: The board, its CPU and RAM, in one line.
        cpu: The board's CPU core type, for the record; None for the host.
        clock_ghz: The board's CPU clock, for the record.
        cores: CPUs the benchmark may use; None for all.
        threads: Default interpreter threads; None means one per usable CPU.
        memory_mb: RAM of the board variant described, for the record.
        memory_limit_mb: Ceiling on private memory (``RLIMIT_DATA``) in MiB; None for none.
    """

    name: str
    description: str
    cpu: str | None = None
    clock_ghz: float | None = None
    cores: int | None = None
    threads: int | None = None
    memory_mb: int | None = None
    memory_limit_mb: int | None = None


@dataclass(frozen=True)
class AppliedLimits:
    """What `apply_profile` could enforce on this machine.

    Attributes:
        cpus: The CPU numbers the process is pinned to.
        threads: The interpreter threads the profile requests, capped at the CPUs.
        memory_limit_mb: The ``RLIMIT_DATA`` ceiling set, or None.
        notes: Where the machine could not match the profile.
    """

    cpus: list[int]
    threads: int
    memory_limit_mb: int | None
    notes: list[str]


def _check_count(path: Path, name: str, key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"{path}: profile {name!r} has invalid {key} {value!r}; "
                           "use a positive integer or null")


def read_json_document(path: Path, schema: str, error: type[Exception], missing: str) -> dict[str, Any]:
    """Read a JSON object whose ``schema`` field must equal `schema`.

    Raises:
        error: With the message `missing` if the file does not exist, or naming the
            file if it is not valid JSON or has another schema.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from problem

    if not isinstance(document, dict) or document.get("schema") != schema:
        raise error(f"{path}: expected schema {schema!r}")
    return document


def parse_profile(path: Path, name: str, values: Any) -> DeviceProfile:
    """Validate one entry of a profiles file.

    Raises:
        ProfileError: If a key is unknown or a value has the wrong type; the message
            names the file, the profile and the key.
    """
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: profile {name!r} must be a JSON object")
    known = {f.name for f in fields(DeviceProfile)} - {"name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProfileError(f"{path}: profile {name!r} has unknown keys {unknown}; known keys: {sorted(known)}")
    if not isinstance(values.get("description"), str) or not values["description"]:
        raise ProfileError(f"{path}: profile {name!r} needs a non-empty description")

    for key in ("cores", "threads", "memory_mb", "memory_limit_mb"):
        _check_count(path, name, key, values.get(key))
    clock = values.get("clock_ghz")
    if clock is not None and (isinstance(clock, bool) or not isinstance(clock, (int, float)) or clock <= 0):
        raise ProfileError(f"{path}: profile {name!r} has invalid clock_ghz {clock!r}")
    return DeviceProfile(name=name, **values)


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Read and validate a profiles file.

    Args:
        path: The JSON file; None reads ``edgeembed/profiles.json`` of this checkout.

    Returns:
        Profiles by name, in file order.

    Raises:
        ProfileError: If the file is missing, is not valid JSON, has another schema,
            or contains an invalid profile.
    """
    path = Path(path) if path is not None else DEFAULT_PROFILES
    document = read_json_document(path, PROFILES_SCHEMA, ProfileError,
                                  f"profiles file {path} not found; pass --profiles FILE")
    entries = document.get("profiles")
    if not isinstance(entries, dict) or not entries:
        raise ProfileError(f"{path}: 'profiles' must be a non-empty object of name: profile")
    return {name: parse_profile(path, name, values) for name, values in entries.items()}


def find_profile(name: str, path: str | Path | None = None) -> DeviceProfile:
    """Return the named profile from a profiles file.

    Raises:
        ProfileError: If the file is invalid or has no profile of that name.
    """
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known profiles: {', '.join(profiles)}")
    return profiles[name]


def apply_profile(profile: DeviceProfile) -> AppliedLimits:
    """Pin this process to the profile's CPU count and cap its private memory.

    Call it in a child process before loading anything large: the memory ceiling
    cannot be raised again above the hard limit, and children inherit both limits.

    Returns:
        The limits that took effect, with a note wherever the machine has fewer
        CPUs than the profile.
    """
    notes = []
    available = sorted(os.sched_getaffinity(0))
    cpus = available
    if profile.cores is not None:
        if profile.cores > len(available):
            notes.append(f"profile {profile.name} asks for {profile.cores} CPUs, this machine allows "
                         f"{len(available)}; using all {len(available)}")
        cpus = available[:profile.cores]
        os.sched_setaffinity(0, cpus)

    limit_mb = profile.memory_limit_mb
    if limit_mb is not None:
        limit = limit_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY and hard < limit:
            notes.append(f"RLIMIT_DATA hard limit {hard >> 20} MiB is below the profile's {limit_mb} MiB")
            limit = hard
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))

    threads = profile.threads or len(cpus)
    if threads > len(cpus):
        notes.append(f"profile {profile.name} asks for {threads} threads on {len(cpus)} CPUs; using {len(cpus)}")
        threads = len(cpus)
    for note in notes:
        logger.warning("%s", note)
    return AppliedLimits(cpus=cpus, threads=threads, memory_limit_mb=limit_mb, notes=notes)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _board_model() -> str | None:
    path = Path("/proc/device-tree/model")
    try:
        return path.read_bytes().rstrip(b"\0").decode("utf-8", errors="replace")
    except OSError:
        return None


def _memory_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def package_versions() -> dict[str, str]:
    """Return the installed versions of the packages that affect the numbers."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def describe_machine(profile: DeviceProfile, applied: AppliedLimits) -> dict[str, Any]:
    """Record the CPU, memory, OS, Python and packages, with the profile applied.

    Returns:
        A JSON-ready dict. The interpreter backend is recorded with each model instead.
    """
    rss_limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return {
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "board": _board_model(),
        "architecture": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_total_mb": _memory_total_mb(),
        "rlimit_data_mb": None if rss_limit == resource.RLIM_INFINITY else rss_limit >> 20,
        "os": _os_name(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": package_versions(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "profile": asdict(profile),
        "applied": asdict(applied),
    }
