"""The bars the gateway must clear with limits and money on, each marked met / not met.

Used by summarize.py (it passes its Runs index). The bars, at TPUT_CONNS (32) connections:

- the gateway with a paid model, Redis off (`gateway`) and on (`gateway-redis`), does at least
  20x the LiteLLM proxy's req/s and 2.5x the Portkey gateway's, and adds at most 0.8 ms p50 over
  direct at one connection;
- two gateway processes on two cores with Redis (`gateway-2proc`) reach at least 1.7x the req/s
  of one such process: within the two-process round, its first process alone and then both,
  alternated (`pairs` in targets.sh), the ratio of each pair; without pairs (older runs), against
  `gateway-redis` in the same round.

Every ratio is taken within a round; the verdict is on the median over the rounds (the cells
show every round, so a bar met by one round and missed by the other is visible).
"""

import statistics

VS_LITELLM = 20.0
VS_PORTKEY = 2.5
ADDED_P50_MS = 0.8
TWO_PROCESSES = 1.7
GATEWAYS = ("gateway", "gateway-redis")
ALL = ("direct", "gateway", "gateway-redis", "gateway-2proc", "litellm", "portkey")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cells(values, digits):
    return " / ".join("-" if v is None else f"{v:,.{digits}f}" for v in values) if values else "-"


def _verdict(value, bar, at_least):
    if value is None:
        return "no data"
    return "met" if (value >= bar if at_least else value <= bar) else "NOT MET"


def bars_section(runs, label, meta, lines, jsonl):
    modes = [m for m in ("json", "stream") if any(runs.series(t, m, "tput", "rps") for t in GATEWAYS)]
    if not modes:
        return
    conns = meta.get("tput_conns", 32)
    lines += [
        "## The bars: limits and money at speed",
        "",
        f"Measured in this run at {conns} connections (req/s) and 1 connection (added p50), with paid models"
        + (" and limits on the key and models (never reached)" if meta.get("limits") == 1 else "")
        + ". Cells are round 1 / round 2 / …; the verdict is on the median of the rounds.",
        "",
        f"#### {conns}-connection req/s of every target",
        "",
        "| target | " + " | ".join(f"{m} req/s" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for t in ALL:
        row = [_cells(runs.series(t, m, "tput", "rps"), 0) for m in modes]
        if any(c != "-" for c in row):
            lines.append(f"| {label.get(t, t)} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| bar | mode | target | per round | median | verdict |",
        "|---|---|---|---|---|---|",
    ]

    def bar(name, mode, target, values, digits, limit, at_least, unit):
        med = _median(values)
        verdict = _verdict(med, limit, at_least)
        shown = "-" if med is None else f"{med:,.{digits}f}{unit}"
        who = label.get(target, target)
        lines.append(f"| {name} | {mode} | {who} | {_cells(values, digits)} | {shown} | {verdict} |")
        jsonl.append(
            {"mode": "bar", "bar": name, "stream_mode": mode, "target": target, "median": med, "verdict": verdict}
        )

    for mode in modes:
        for t in GATEWAYS:
            if not runs.series(t, mode, "tput", "rps"):
                continue
            ratio = runs.relative(t, mode, "tput", "rps", "litellm", lambda a, b: a / b)
            bar(f"≥ {VS_LITELLM:g}x LiteLLM req/s", mode, t, ratio, 1, VS_LITELLM, True, "x")
            ratio = runs.relative(t, mode, "tput", "rps", "portkey", lambda a, b: a / b)
            bar(f"≥ {VS_PORTKEY:g}x Portkey req/s", mode, t, ratio, 2, VS_PORTKEY, True, "x")
            added = runs.relative(t, mode, "lat", "p50_ms", "direct", lambda a, b: a - b)
            bar(f"added p50 ≤ {ADDED_P50_MS:g} ms", mode, t, added, 2, ADDED_P50_MS, False, " ms")
        if runs.series("gateway-2proc", mode, "tput", "rps"):
            across = runs.relative("gateway-2proc", mode, "tput", "rps", "gateway-redis", lambda a, b: a / b)
            name = f"2 processes ≥ {TWO_PROCESSES:g}x 1 process"
            paired = pair_ratios(runs, mode)
            bar(name, mode, "gateway-2proc", paired or across, 2, TWO_PROCESSES, True, "x")
            if paired:
                who = label.get("gateway-2proc", "gateway-2proc")
                lines.append(f"| (against the one-process target) | {mode} | {who} | {_cells(across, 2)} | | |")
    lines.append("")
    two_proc_note(runs, modes, lines)


def pair_ratios(runs, mode):
    """Per round, the median over its pairs of (both processes' req/s) / (the first one's alone)."""
    out = []
    for rnd in runs.rounds:
        ratios, i = [], 1
        while (one := runs.get("gateway-2proc", mode, f"pair{i}-one", rnd)) and (
            both := runs.get("gateway-2proc", mode, f"pair{i}-both", rnd)
        ):
            if one.get("rps"):
                ratios.append(both["rps"] / one["rps"])
            i += 1
        if ratios:
            out.append(_median(ratios))
    return out


def two_proc_note(runs, modes, lines):
    """What the rest of the machine takes from the two-process round: its ceiling is below 2x by that much."""
    notes = []
    for mode in modes:
        two = [c for c in runs.series("gateway-2proc", mode, "cpu", "cores") if c]
        one = [c for c in runs.series("gateway-redis", mode, "cpu", "cores") if c]
        if two and one:
            # Measured (bench/cpu_share.py): if both processes did per core what one did, they would
            # reach (the cores left to them) / (the cores one process used) of its req/s.
            took = {role: _median([c[role] for c in two]) for role in ("redis", "postgres", "mock", "rest")}
            others = sum(took.values())
            used = _median([c["server"] for c in one])
            notes.append(
                f"{mode}: Redis {took['redis']:.2f}, PostgreSQL {took['postgres']:.2f}, the mocks {took['mock']:.2f}, "
                f"wrk, the kernel and the rest {took['rest']:.2f}: {others:.2f} of a core in all, while one "
                f"process used {used:.2f}, so a ceiling near {(2 - others) / used:.2f}x"
            )
            continue
        # Without CPU records: direct saturates one core with the mock upstream and wrk together, so
        # at N req/s the two of them need about N / direct req/s of a core.
        share = runs.relative("gateway-2proc", mode, "tput", "rps", "direct", lambda a, b: a / b)
        if share:
            med = _median(share)
            notes.append(f"{mode}: wrk and the mocks {med:.2f} of a core (estimated), so a ceiling near {2 - med:.2f}x")
    if notes:
        lines += [
            "In the two-process round everything else shares both cores with the gateway processes (in the "
            "one-process round the gateway has a core of its own). What the rest took there: " + "; ".join(notes) + ".",
            "",
        ]
