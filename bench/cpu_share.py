#!/usr/bin/env python3
"""Where the machine's CPU went during a measurement, by role: the server process(es) under test,
Redis, PostgreSQL, the mock upstreams, and the rest (wrk, the kernel, anything else).

    python3 bench/cpu_share.py snap --server PID... --mock PID...   -> one JSON object of CPU ticks
    python3 bench/cpu_share.py diff BEFORE AFTER                     -> cores used by each role

`snap` reads /proc: the machine's busy ticks (/proc/stat), and per role the user + system ticks of
its processes (a server's child processes count as the server's; Redis and PostgreSQL are every
process named redis-server and postgres). `diff` turns two snapshots into cores used on average
between them (1.0 = one CPU busy all the time); "rest" is the machine's busy time less the roles'.
Linux only, standard library only. run.sh records one per 32-connection run (kind=cpu), and
summarize.py shows them with :func:`cpu_table`.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROLES = ("server", "redis", "postgres", "mock")
COLUMNS = (
    ("server", "server(s)"),
    ("redis", "Redis"),
    ("postgres", "PostgreSQL"),
    ("mock", "mock upstreams"),
    ("rest", "wrk, kernel, rest"),
    ("idle", "idle"),
)
BY_NAME = {"redis-server": "redis", "postgres": "postgres"}


def _processes():
    """pid -> (name, parent pid, user + system ticks) of every process readable now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # After the name: state, ppid, ... utime and stime are the 14th and 15th fields of the line.
        found[int(entry)] = (name, int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def _with_descendants(roots, processes):
    children = {}
    for pid, (_, parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    seen, todo = set(), [pid for pid in roots if pid in processes]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def snap(server, mock):
    processes = _processes()
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    ticks = {"busy": sum(cpu) - cpu[3] - cpu[4]}
    members = {"server": _with_descendants(server, processes), "mock": _with_descendants(mock, processes)}
    for role in ROLES:
        ticks[role] = 0
    for pid, (name, _, used) in processes.items():
        role = next((r for r in ("server", "mock") if pid in members[r]), BY_NAME.get(name))
        if role:
            ticks[role] += used
    return {"at": time.monotonic(), "ticks": ticks}


def diff(before, after):
    seconds = after["at"] - before["at"]
    scale = os.sysconf("SC_CLK_TCK") * seconds
    used = {key: (after["ticks"][key] - before["ticks"][key]) / scale for key in after["ticks"]}
    cores = {role: round(used[role], 3) for role in ROLES}
    cores["rest"] = round(max(0.0, used["busy"] - sum(used[role] for role in ROLES)), 3)
    cores["idle"] = round(max(0.0, (os.cpu_count() or 1) - used["busy"]), 3)
    return {"seconds": round(seconds, 2), "cores": cores}


def cpu_table(runs, targets, meta, label, lines, jsonl):
    """The table of a run's CPU shares, per target and mode (cells: round 1 / round 2 / …)."""
    rows = [(t, m) for t in targets for m in ("json", "stream") if runs.series(t, m, "cpu", "cores")]
    if not rows:
        return
    lines += [
        f"### Where the CPU went during the {meta.get('tput_conns', 32)}-connection runs",
        "",
        "Cores used on average (of the machine's all), per role (bench/cpu_share.py).",
        "",
        "| target | mode | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for t, mode in rows:
        shares = runs.series(t, mode, "cpu", "cores")
        columns = [" / ".join(f"{c[role]:.2f}" for c in shares) for role, _ in COLUMNS]
        lines.append(f"| {label.get(t, t)} | {mode} | " + " | ".join(columns) + " |")
        medians = {role: statistics.median(c[role] for c in shares) for role, _ in COLUMNS}
        jsonl.append({"target": t, "mode": "cpu", "stream_mode": mode} | medians)
    lines.append("")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    take = sub.add_parser("snap")
    take.add_argument("--server", type=int, nargs="*", default=[])
    take.add_argument("--mock", type=int, nargs="*", default=[])
    compare = sub.add_parser("diff")
    compare.add_argument("before")
    compare.add_argument("after")
    args = parser.parse_args()
    if args.command == "snap":
        print(json.dumps(snap(args.server, args.mock)))
    else:
        print(json.dumps(diff(json.loads(args.before), json.loads(args.after))))


if __name__ == "__main__":
    sys.exit(main())
