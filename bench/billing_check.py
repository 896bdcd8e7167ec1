"""The billing check of a bench run (used by summarize.py).

For every gateway server start, run.sh records the bench user's balance before the server
started and after it stopped; this compares what was charged with what the requests that got
a 2xx answer should cost, at the run's tariff and the token counts of the upstream's usage block.
"""

import json

# Charged / expected outside this range means requests went unbilled or were billed twice; the upper
# end leaves room for the requests still in flight when a wrk run stops (typically 1.002-1.01).
BILLED_ONCE = (0.99, 1.05)


def _fmt(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def _row(*values):
    return "| " + " | ".join(str(v) for v in values) + " |"


def smoke_usage(run_dir, rnd, target):
    """(prompt_tokens, completion_tokens) from the JSON smoke reply of that round (or any round)."""
    files = [run_dir / "logs" / f"smoke-r{rnd}-{target}-json.txt"]
    files += sorted((run_dir / "logs").glob(f"smoke-r*-{target}-json.txt"))
    for path in files:
        try:
            usage = json.loads(path.read_text())["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def billing_table(recs, meta, run_dir, label, lines, jsonl):
    """Append the billing table; return the (round, target, ratio) of every run not billed once."""
    bills = [r for r in recs if r.get("kind") == "billing"]
    wrong = []
    if not bills:
        return wrong
    price_in, price_out = meta.get("input_price", 0.5), meta.get("output_price", 1.5)
    lines += [
        "### Billing check",
        "",
        "Credits the bench user was charged while the server ran, against what the requests that got a 2xx "
        f"answer should cost at {price_in} / {price_out} credits per 1M input / output tokens (token counts "
        "from the upstream's usage block). About 1.0 means every request was billed once; requests still "
        "in flight when wrk stopped can push it a little above 1.",
        "",
        "| round | target | 2xx requests sent | credits charged | expected | charged / expected |",
        "|---|---|---|---|---|---|",
    ]
    for b in bills:
        rnd, target = b["round"], b["target"]
        sent = 0
        modes, smoked = set(), 0
        for r in recs:
            if r.get("round") != rnd or r.get("target") != target:
                continue
            if r.get("kind") == "wrk":
                sent += max(0, r.get("requests", 0) - r.get("non2xx", 0))
                modes.add(r.get("mode"))
            elif r.get("kind") == "smoke":
                smoked += r.get("count", 1)
        sent += smoked or len(modes)  # the smoke requests (older runs: one before each mode)
        try:
            charged = float(b["credits_before"]) - float(b["credits_after"])
        except (KeyError, TypeError, ValueError):
            charged = None
        usage = smoke_usage(run_dir, rnd, target)
        expected = sent * (usage[0] * price_in + usage[1] * price_out) / 1e6 if usage else None
        ratio = charged / expected if charged is not None and expected else None
        if ratio is not None and not BILLED_ONCE[0] <= ratio <= BILLED_ONCE[1]:
            wrong.append((rnd, target, ratio))
        lines.append(_row(rnd, label.get(target, target), sent, _fmt(charged, 4), _fmt(expected, 4), _fmt(ratio, 3)))
        jsonl.append(
            {
                "target": target,
                "mode": "billing",
                "round": rnd,
                "requests_2xx": sent,
                "credits_charged": charged,
                "credits_expected": expected,
                "charged_over_expected": ratio,
            }
        )
    lines.append("")
    return wrong


def billing_warning(wrong, label):
    """A paragraph for the top of the summary when a gateway run was not billed once per request."""
    if not wrong:
        return []
    runs = ", ".join(f"{label.get(t, t)} in round {r} ({ratio:.3f})" for r, t, ratio in wrong)
    return [
        f"**Billing check failed** (charged / expected outside {BILLED_ONCE[0]} to {BILLED_ONCE[1]}): {runs}. "
        "Those figures are of a gateway that did not charge each request once; see the server logs.",
        "",
    ]
