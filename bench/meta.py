#!/usr/bin/env python3
"""Write a run's meta.json: the machine, the versions measured and the run's settings.

    META_...=... python3 bench/meta.py OUT_DIR/meta.json

bench/run.sh passes every setting as a META_* environment variable. Standard library only.
"""

import json
import os
import platform
import subprocess
import sys

NUMBERS = {
    "rounds",
    "lat_conns",
    "tput_conns",
    "slow",
    "slow_delay_ms",
    "slow_conns",
    "input_price",
    "output_price",
    "scale_keys",
    "scale_models",
    "scale_users",
    "limits",
}


def out(*cmd: str, any_status: bool = False) -> str:
    """What CMD prints, or "" when it fails (`wrk -v` prints its version and exits with 1)."""
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 or any_status else ""


def python_version_of(python: str, module: str) -> str:
    if not os.path.exists(python):
        return ""
    return out(python, "-c", f"import importlib.metadata as m; print(m.version({module!r}))")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def main(path: str) -> None:
    env = {k[len("META_") :].lower(): v for k, v in os.environ.items() if k.startswith("META_")}
    meta: dict[str, object] = {}
    for key, value in env.items():
        if key in NUMBERS:
            meta[key] = float(value) if "." in value else int(value)
        elif key in {"targets", "modes"}:
            meta[key] = value.split()
        else:
            meta[key] = value
    py, mock_py = env.get("py", ""), env.get("mock_py", "python3")
    portkey_pkg = os.path.join(env.get("portkey_dir", ""), "node_modules/@portkey-ai/gateway/package.json")
    portkey = ""
    if os.path.exists(portkey_pkg):
        with open(portkey_pkg) as f:
            portkey = json.load(f).get("version", "")
    meta.update(
        {
            "host_cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": out(mock_py, "-c", "import sys; print(sys.version.split()[0])"),
            "django": python_version_of(py, "django"),
            "uvicorn": python_version_of(py, "uvicorn"),
            "litellm": python_version_of(os.path.join(env.get("litellm_venv", ""), "bin/python"), "litellm"),
            "portkey": portkey,
            "node": out("node", "--version") if portkey else "",
            "wrk": (out("wrk", "-v", any_status=True).splitlines() or [""])[0].split(" Copyright")[0],
            "git_rev": out("git", "-C", env.get("root", "."), "rev-parse", "--short", "HEAD"),
        }
    )
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
