#!/usr/bin/env python3
"""Turn a bench run directory into tables.

    python3 bench/summarize.py bench/results/<stamp>

Reads results.jsonl (+ meta.json) and writes summary.md (markdown tables, printed too) and
summary.jsonl (one JSON line per target and measurement, medians over the rounds).
Every comparison uses the baseline of the SAME round: "added p50" is the target's p50 minus
the direct p50 of that round, and ratios divide by that round's direct (LiteLLM, Portkey) req/s.
The bars the gateway must clear come first (bars.py). Standard library only.
"""

import json
import statistics
import sys
from pathlib import Path

from bars import bars_section
from billing_check import billing_table, billing_warning
from cpu_share import cpu_table

ORDER = [
    "direct",
    "gateway",
    "gateway-redis",
    "gateway-2proc",
    "gateway-httpx",
    "gateway-aiohttp",
    "gateway-daphne",
    "gateway-scale",
    "litellm",
    "portkey",
]
LABEL = {
    "direct": "direct (mock upstream)",
    "gateway": "gateway (SQLite, no Redis)",
    "gateway-redis": "gateway + Redis",
    "gateway-2proc": "gateway + Redis, 2 processes",
    "gateway-httpx": "gateway, httpx API on httpx-aiohttp",
    "gateway-aiohttp": "gateway, aiohttp's client",
    "gateway-daphne": "gateway on daphne",
    "gateway-scale": "gateway at scale",
    "litellm": "LiteLLM proxy",
    "portkey": "Portkey gateway",
}
PEERS = (("litellm", "LiteLLM"), ("portkey", "Portkey"))
MODE_TITLE = {"json": "Non-stream chat completion (JSON)", "stream": "`stream: true` (SSE, include_usage)"}


def load(run_dir):
    recs = []
    with open(run_dir / "results.jsonl") as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    meta = {}
    if (run_dir / "meta.json").exists():
        meta = json.loads((run_dir / "meta.json").read_text())
    return recs, meta


def target_order(names):
    return sorted(set(names), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def cells(values, digits=2):
    return " / ".join(fmt(v, digits) for v in values) if values else "-"


def md_row(*values):
    return "| " + " | ".join(str(v) for v in values) + " |"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Runs:
    """Index of wrk records: (target, mode, phase) -> {round: record}; the CPU shares of the
    32-connection runs (bench/cpu_share.py) as phase "cpu"."""

    def __init__(self, recs):
        self.idx = {}
        self.rounds = sorted({r["round"] for r in recs if r.get("kind") == "wrk"})
        for r in recs:
            if r.get("kind") in ("wrk", "cpu"):
                self.idx.setdefault((r["target"], r["mode"], r.get("phase", "cpu")), {})[r["round"]] = r

    def get(self, target, mode, phase, rnd):
        return self.idx.get((target, mode, phase), {}).get(rnd)

    def series(self, target, mode, phase, field):
        out = []
        for rnd in self.rounds:
            r = self.get(target, mode, phase, rnd)
            if r is not None:
                out.append(r.get(field))
        return out

    def relative(self, target, mode, phase, field, base_target, op):
        """Per-round op(target value, base value), for rounds where both exist."""
        out = []
        for rnd in self.rounds:
            a = self.get(target, mode, phase, rnd)
            b = self.get(base_target, mode, phase, rnd)
            if a is None or b is None:
                continue
            x, y = a.get(field), b.get(field)
            if x is None or y is None:
                continue
            try:
                out.append(op(x, y))
            except ZeroDivisionError:
                out.append(None)
        return out

    def errors(self, target, mode):
        return sum(
            max(0, r.get("errors", 0))
            for (t, m, phase), by_round in self.idx.items()
            if t == target and m == mode and phase not in ("warmup", "cpu")
            for r in by_round.values()
        )


def main_table(runs, targets, mode, lat_conns, tput_conns, lines, jsonl):
    peers = [(p, name) for p, name in PEERS if any(runs.get(p, mode, "tput", r) for r in runs.rounds)]
    head = [
        "target",
        f"{lat_conns}-conn p50 ms",
        f"{lat_conns}-conn p99 ms",
        "added p50 ms vs direct",
        f"{tput_conns}-conn req/s",
        f"{tput_conns}-conn p99 ms",
        "req/s ratio vs direct",
    ]
    head += [f"req/s ratio vs {name}" for _, name in peers]
    head.append("errors")
    lines += ["### " + MODE_TITLE.get(mode, mode), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in targets:
        if not runs.series(t, mode, "lat", "p50_ms") and not runs.series(t, mode, "tput", "rps"):
            continue
        lat50 = runs.series(t, mode, "lat", "p50_ms")
        lat99 = runs.series(t, mode, "lat", "p99_ms")
        rps = runs.series(t, mode, "tput", "rps")
        tp99 = runs.series(t, mode, "tput", "p99_ms")
        vs_peer = {}
        if t == "direct":
            added, ratio = "(baseline)", "(baseline)"
            added_v = ratio_v = None
        else:
            added_v = runs.relative(t, mode, "lat", "p50_ms", "direct", lambda a, b: a - b)
            ratio_v = runs.relative(t, mode, "tput", "rps", "direct", lambda a, b: a / b)
            added, ratio = cells(added_v), cells(ratio_v, 4)
        for p, _ in peers:
            if t not in ("direct", p):
                vs_peer[p] = runs.relative(t, mode, "tput", "rps", p, lambda a, b: a / b)
        row = [LABEL.get(t, t), cells(lat50, 3), cells(lat99, 3), added, cells(rps), cells(tp99), ratio]
        row += ["(peer)" if t == p else cells(vs_peer[p]) if p in vs_peer else "-" for p, _ in peers]
        row.append(str(runs.errors(t, mode)))
        lines.append("| " + " | ".join(row) + " |")
        jsonl.append(
            {
                "target": t,
                "mode": mode,
                "rounds": len(rps),
                "lat_conns": lat_conns,
                "lat_p50_ms": median(lat50),
                "lat_p99_ms": median(lat99),
                "added_p50_ms": median(added_v) if isinstance(added_v, list) else None,
                "tput_conns": tput_conns,
                "tput_rps": median(rps),
                "tput_p99_ms": median(tp99),
                "rps_ratio_vs_direct": median(ratio_v) if isinstance(ratio_v, list) else None,
                "rps_ratio_vs_litellm": median(vs_peer["litellm"]) if "litellm" in vs_peer else None,
                "rps_ratio_vs_portkey": median(vs_peer["portkey"]) if "portkey" in vs_peer else None,
                "errors": runs.errors(t, mode),
            }
        )
    lines.append("")


def slow_table(runs, targets, meta, lines, jsonl):
    if not any(runs.series(t, "slow", "tput", "rps") for t in targets):
        return
    conns, delay = meta.get("slow_conns", 100), meta.get("slow_delay_ms", 100)
    ideal = conns / (delay / 1000.0) if delay else None
    lines += [
        f"### Slow upstream: {conns} connections, upstream waits {delay} ms",
        "",
        f'The ceiling is connections / delay = {fmt(ideal)} req/s. "fraction of direct" is the gateway\'s req/s '
        "divided by the direct req/s of the same round.",
        "",
        "| target | req/s | p50 ms | p99 ms | fraction of direct | errors |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        rps = runs.series(t, "slow", "tput", "rps")
        if not rps:
            continue
        frac = (
            "(baseline)"
            if t == "direct"
            else cells(runs.relative(t, "slow", "tput", "rps", "direct", lambda a, b: a / b), 3)
        )
        lines.append(
            md_row(
                LABEL.get(t, t),
                cells(rps),
                cells(runs.series(t, "slow", "tput", "p50_ms")),
                cells(runs.series(t, "slow", "tput", "p99_ms")),
                frac,
                runs.errors(t, "slow"),
            )
        )
        jsonl.append(
            {
                "target": t,
                "mode": "slow",
                "conns": conns,
                "delay_ms": delay,
                "rps": median(rps),
                "p50_ms": median(runs.series(t, "slow", "tput", "p50_ms")),
                "p99_ms": median(runs.series(t, "slow", "tput", "p99_ms")),
                "fraction_of_direct": None
                if t == "direct"
                else median(runs.relative(t, "slow", "tput", "rps", "direct", lambda a, b: a / b)),
                "errors": runs.errors(t, "slow"),
            }
        )
    lines.append("")


def scale_table(runs, rss, meta, lines, jsonl):
    tput_conns = meta.get("tput_conns", 32)
    if not runs.series("gateway-scale", "json", "tput", "rps") or not runs.series("gateway", "json", "tput", "rps"):
        return
    lines += [
        f"### Snapshot scale: {meta.get('scale_keys', '?')} keys, {meta.get('scale_models', '?')} models in the DB",
        "",
        "Same gateway, same request; only the database differs. "
        f"Seeding took {meta.get('scale_seed_seconds') or '?'} s (one process).",
        "",
        "| measurement | gateway | gateway at scale | scale / plain |",
        "|---|---|---|---|",
    ]
    out = {"target": "gateway-scale", "mode": "scale-vs-plain"}
    for mode in [m for m in ("json", "stream") if runs.series("gateway-scale", m, "tput", "rps")]:
        for phase, field, label in (("lat", "p50_ms", "1-conn p50 ms"), ("tput", "rps", f"{tput_conns}-conn req/s")):
            a = runs.series("gateway", mode, phase, field)
            b = runs.series("gateway-scale", mode, phase, field)
            r = runs.relative("gateway-scale", mode, phase, field, "gateway", lambda x, y: x / y)
            lines.append(f"| {mode} {label} | {cells(a, 3)} | {cells(b, 3)} | {cells(r)} |")
            out[f"{mode}_{field}_ratio"] = median(r)
    for key, label in (("ready_s", "start-up until ready, s"), ("peak_kb", "peak RSS MiB")):
        a = [x.get(key) for x in rss.get("gateway", [])]
        b = [x.get(key) for x in rss.get("gateway-scale", [])]
        if key == "peak_kb":
            a = [v / 1024 if v else None for v in a]
            b = [v / 1024 if v else None for v in b]
        if a and b:
            lines.append(md_row(label, cells(a), cells(b), fmt(median(b) / median(a)) if median(a) else "-"))
    jsonl.append(out)
    lines.append("")


def rss_table(rss, targets, lines, jsonl):
    if not rss:
        return
    lines += [
        "### Memory (VmRSS of the one server process; of the first one for 2 processes) and start-up",
        "",
        "| target | ready after s | RSS idle MiB | RSS peak under load MiB | RSS at end MiB |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        rows = rss.get(t)
        if not rows:
            continue

        def mib(key, rows=rows):
            return [r.get(key, 0) / 1024.0 for r in rows]

        lines.append(
            md_row(
                LABEL.get(t, t),
                cells([r.get("ready_s") for r in rows]),
                cells(mib("idle_kb"), 1),
                cells(mib("peak_kb"), 1),
                cells(mib("end_kb"), 1),
            )
        )
        jsonl.append(
            {
                "target": t,
                "mode": "rss",
                "ready_s": median([r.get("ready_s") for r in rows]),
                "idle_mib": median(mib("idle_kb")),
                "peak_mib": median(mib("peak_kb")),
            }
        )
    lines.append("")


def header_lines(meta):
    """What was measured, on what, and how the processes were laid out on the CPUs."""
    peers = []
    if meta.get("litellm"):
        peers.append(f"LiteLLM {meta['litellm']}")
    if meta.get("portkey"):
        peers.append(f"Portkey gateway {meta['portkey']} on Node {meta.get('node') or '?'}")
    shared = {
        "postgresql": "a scratch PostgreSQL database",
        "sqlite": "a SQLite file",
        "external": "BENCH_SHARED_DATABASE_URL",
    }
    return [
        "- Machine: {}, {} CPUs, kernel {}. Python {}, Django {}, uvicorn {}; peers: {}; {}.".format(
            meta.get("host_cpu") or "?",
            meta.get("cpus"),
            meta.get("kernel"),
            meta.get("python") or "?",
            meta.get("django") or "-",
            meta.get("uvicorn") or "-",
            ", ".join(peers) or "none installed",
            meta.get("wrk") or "wrk",
        ),
        "- Pinning: one-process servers (gateway, peers) on CPU {}, mock upstreams and wrk on CPU {}. "
        "Two processes: on CPUs {}, with wrk (one per process) and the mock upstreams on CPUs {}.".format(
            meta.get("gateway_cpus") or "any",
            meta.get("load_cpus") or "any",
            " and ".join((meta.get("two_proc_cpus") or "any").split()),
            meta.get("two_proc_load_cpus") or "any",
        ),
        "- Each round: {} warm-up, then {} at {} connection(s) and {} at {} connections; {} round(s), "
        "servers restarted every round, even rounds in reverse order. Cells are round 1 / round 2 / …".format(
            meta.get("warmup"),
            meta.get("duration"),
            meta.get("lat_conns"),
            meta.get("duration"),
            meta.get("tput_conns"),
            meta.get("rounds"),
        ),
        "- Gateway DB: {}; with Redis: {}, Redis {}. Limits on the bench key and models: {}. git {}.".format(
            meta.get("gateway_db", "?"),
            shared.get(meta.get("shared_db", ""), "-"),
            meta.get("redis") or "not used",
            "on (never reached)" if meta.get("limits") == 1 else "off",
            meta.get("git_rev") or "(no commit)",
        ),
        "",
    ]


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    recs, meta = load(run_dir)
    if meta.get("scale_keys"):
        LABEL["gateway-scale"] = f"gateway, {meta['scale_keys']} keys / {meta.get('scale_models', '?')} models"
    runs = Runs(recs)
    targets = target_order([r["target"] for r in recs if r.get("kind") in ("wrk", "rss")])
    rss = {}
    for r in recs:
        if r.get("kind") == "rss":
            rss.setdefault(r["target"], []).append(r)

    lines = [f"# Benchmark run {meta.get('stamp', run_dir.name)}", ""]
    if meta:
        lines += header_lines(meta)
    lat_conns = meta.get("lat_conns", 1)
    tput_conns = meta.get("tput_conns", 32)
    jsonl = []
    modes = [m for m in ("json", "stream") if any(k[1] == m for k in runs.idx)]
    bars = []
    bars_section(runs, LABEL, meta, bars, jsonl)
    at_bars = len(lines)
    lines += bars
    if modes:
        lines += ["## All measurements", ""]
    for mode in modes:
        main_table(runs, targets, mode, lat_conns, tput_conns, lines, jsonl)
    slow_table(runs, targets, meta, lines, jsonl)
    cpu_table(runs, targets, meta, LABEL, lines, jsonl)
    scale_table(runs, rss, meta, lines, jsonl)
    rss_table(rss, targets, lines, jsonl)
    wrong = billing_table(recs, meta, run_dir, LABEL, lines, jsonl)
    # Right under the bars' table: a bar met by a gateway that does not charge is not met.
    lines[at_bars + len(bars) : at_bars + len(bars)] = billing_warning(wrong, LABEL)

    extra = [r for r in recs if r.get("kind") not in ("wrk", "cpu", "rss", "error", "billing", "smoke")]
    if extra:
        lines += ["### Other results (flex queue, …)", "", "```"]
        lines += [json.dumps(r) for r in extra]
        lines += ["```", ""]
    errors = [r for r in recs if r.get("kind") == "error"]
    if errors:
        lines += ["### Problems", ""]
        for e in errors:
            lines.append(
                "- round {}, {} {}: {} failed (see {})".format(
                    e.get("round", "-"), e.get("target"), e.get("mode", ""), e.get("what"), e.get("log", "logs/")
                )
            )
        lines.append("")

    text = "\n".join(lines)
    (run_dir / "summary.md").write_text(text + "\n")
    with open(run_dir / "summary.jsonl", "w") as f:
        for row in jsonl:
            f.write(json.dumps(row) + "\n")
    print(text)
    print("\n## JSON lines\n")
    for row in jsonl:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
