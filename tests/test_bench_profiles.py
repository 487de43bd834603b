"""Device profiles: loading and validating the shipped profiles.json, and applying limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeembed.bench_machine import DEFAULT_PROFILES, ProfileError, find_profile, load_profiles
from edgeembed.cli import main


def _write(tmp_path, profiles: dict, schema: str = "edgeembed.bench-profiles/1"):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"schema": schema, "profiles": profiles}))
    return path


def test_shipped_profiles_load():
    profiles = load_profiles()
    assert list(profiles) == ["pi-zero-2w", "pi3", "pi4", "pi5", "host"]


def test_shipped_profiles_limits():
    profiles = load_profiles(DEFAULT_PROFILES)
    for name in ("pi-zero-2w", "pi3", "pi4", "pi5"):
        assert profiles[name].cores == 4, name
        assert profiles[name].memory_limit_mb < profiles[name].memory_mb, name
    assert profiles["host"].cores is None
    assert profiles["host"].memory_limit_mb is None


def test_find_unknown_profile():
    with pytest.raises(ProfileError, match="unknown profile 'pi9'; known profiles: pi-zero-2w"):
        find_profile("pi9")


def test_profile_unknown_key(tmp_path):
    path = _write(tmp_path, {"board": {"description": "a board", "ram": 512}})
    with pytest.raises(ProfileError, match=r"profile 'board' has unknown keys \['ram'\]"):
        load_profiles(path)


@pytest.mark.parametrize("key, value", [("cores", 0), ("threads", -2), ("memory_limit_mb", "512"),
                                        ("cores", True), ("clock_ghz", 0)])
def test_profile_invalid_value(tmp_path, key, value):
    path = _write(tmp_path, {"board": {"description": "a board", key: value}})
    with pytest.raises(ProfileError, match=f"invalid {key}"):
        load_profiles(path)


def test_profile_missing_description(tmp_path):
    path = _write(tmp_path, {"board": {"cores": 2}})
    with pytest.raises(ProfileError, match="needs a non-empty description"):
        load_profiles(path)


def test_profiles_wrong_schema(tmp_path):
    path = _write(tmp_path, {"board": {"description": "a board"}}, schema="other/1")
    with pytest.raises(ProfileError, match="expected schema"):
        load_profiles(path)


def test_profiles_not_json(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text("{profiles: }")
    with pytest.raises(ProfileError, match="is not valid JSON"):
        load_profiles(path)


def test_profiles_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not found; pass --profiles FILE"):
        load_profiles(tmp_path / "none.json")


def test_profile_extension_loads(tmp_path):
    path = _write(tmp_path, {"jetson": {"description": "a new board", "cores": 1, "threads": 1,
                                        "memory_limit_mb": 256}})
    profile = find_profile("jetson", path)
    assert profile.cores == 1
    assert profile.memory_limit_mb == 256


def test_cli_unknown_profile(tmp_path):
    assert main(["bench", "--photos", str(tmp_path), "--profile", "pi9"]) == 2


def test_apply_in_child():
    script = ("import json, os, resource\n"
              "from edgeembed.bench_machine import apply_profile, find_profile\n"
              "applied = apply_profile(find_profile('pi-zero-2w'))\n"
              "print(json.dumps([sorted(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_DATA)[0],"
              " applied.threads]))\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    cpus, limit, threads = json.loads(output)
    usable = min(4, len(os.sched_getaffinity(0)))
    assert len(cpus) == usable
    assert limit == 350 * 1024 * 1024
    assert threads == usable
