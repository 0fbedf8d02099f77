"""Records and renders the runs of scripts/lm-serving-bench.sh.

``record``: appends one load's result to a JSON-lines file: which server, its workers,
the round, the callers, the report of ``snakepool bench --json`` and what the fake LM
counted (completions answered, most in flight at once).

``render``: from that file and the run's metadata, writes one JSON file (every load
and the medians), a markdown table, the plot ``docs/bench/lm_serving.png``, and the
last section of ``BENCHMARKS.md`` (everything from its marker to the end of the file is
replaced; the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

MARKER = "<!-- lm-serving: written by scripts/lm-serving-bench.sh from here to the end -->"
TITLE = "## LM-bound calls: `snakepool serve` against DSPy's FastAPI deployment"
KIB_PER_MIB = 1024.0


# ---------------------------------------------------------------- record


def fetch_json(url: str, method: str = "GET") -> Dict[str, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def record(args: argparse.Namespace) -> int:
    report = json.loads(Path(args.bench).read_text())
    lm_before = json.loads(Path(args.lm_before).read_text())
    lm_after = fetch_json(args.lm_url + "/stats")
    line = {
        "side": args.side,
        "label": args.label,
        "workers": args.workers,
        "round": args.round,
        "callers": args.callers,
        "bench": report,
        "lm": {
            "completions": lm_after["requests"] - lm_before["requests"],
            "max_in_flight": lm_after["max_in_flight"],
        },
    }
    with open(args.results, "a") as out:
        out.write(json.dumps(line) + "\n")
    return 0


# ---------------------------------------------------------------- render


def median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def load_results(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figures(run: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of one load."""
    bench = run["bench"]
    resources = bench["resources"]
    watched = resources["watched"]
    server = watched.get("server", {})
    lm = watched.get("lm", {})
    latency = bench["latency_us"]
    errors = sum(bench["errors"].values())
    return {
        "calls_per_s": bench["throughput_rps"],
        "calls": bench["requests"],
        "errors": errors,
        "error_kinds": bench["errors"],
        "answers_matching": (bench.get("dspy") or {}).get("answers_matching"),
        "p50_ms": latency["p50"] / 1000.0,
        "p99_ms": latency["p99"] / 1000.0,
        "server_cpu_ms_per_call": (server.get("cpu_us_per_call") or 0) / 1000.0
        if server.get("cpu_us_per_call") is not None
        else None,
        "server_cores": server.get("cores"),
        "server_busiest_cores": server["busiest"][0]["cpu_s"] / bench["elapsed_s"]
        if server.get("busiest")
        else None,
        "server_processes": server.get("processes"),
        "server_pss_mib": server.get("pss_kib", 0) / KIB_PER_MIB if server else None,
        "lm_cpu_ms_per_call": lm.get("cpu_us_per_call") / 1000.0
        if lm.get("cpu_us_per_call") is not None
        else None,
        "lm_cores": lm.get("cores"),
        "bench_cpu_ms_per_call": resources["bench_cpu_us_per_call"] / 1000.0
        if resources.get("bench_cpu_us_per_call") is not None
        else None,
        "busy_cores": resources.get("busy_cores"),
        "bench_cores": resources["bench_cpu_s"] / bench["elapsed_s"],
        "other_cores": None
        if resources.get("busy_cores") is None
        else max(
            0.0,
            resources["busy_cores"]
            - (server.get("cores") or 0)
            - (lm.get("cores") or 0)
            - resources["bench_cpu_s"] / bench["elapsed_s"],
        ),
        "lm_max_in_flight": run["lm"]["max_in_flight"],
        "lm_completions": run["lm"]["completions"],
        "elapsed_s": bench["elapsed_s"],
    }


def aggregate(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per server and callers: the median of the rounds and each round's value."""
    groups: "OrderedDict[Tuple[str, int], List[Dict[str, Any]]]" = OrderedDict()
    for run in sorted(runs, key=lambda r: (r["label"], r["callers"], r["round"])):
        groups.setdefault((run["label"], run["callers"]), []).append(run)
    rows = []
    for (label, callers), group in groups.items():
        per_round = [figures(run) for run in group]
        row: Dict[str, Any] = {
            "label": label,
            "side": group[0]["side"],
            "workers": group[0]["workers"],
            "callers": callers,
            "rounds": [run["round"] for run in group],
            "per_round": per_round,
        }
        for key in per_round[0]:
            if key == "error_kinds":
                continue
            row[key] = median([f[key] for f in per_round])
        row["errors"] = sum(f["errors"] for f in per_round)
        rows.append(row)
    order = {"fastapi": 0, "snakepool": 1}
    rows.sort(key=lambda r: (r["callers"], order.get(r["side"], 2), r["workers"]))
    return rows


def markdown_table(rows: List[Dict[str, Any]], latency_ms: float) -> str:
    lines = [
        "| server | callers | calls/s (median) | calls/s per round | ÷ limit | p50 ms | p99 ms "
        "| server CPU ms/call | LM calls in flight (max) | PSS MiB | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        limit = row["callers"] / (latency_ms / 1000.0)
        rounds = ", ".join(fmt(f["calls_per_s"], 1) for f in row["per_round"])
        lines.append(
            f"| {row['label']} | {row['callers']} | **{fmt(row['calls_per_s'], 1)}** | {rounds} "
            f"| {row['calls_per_s'] / limit:.2f} | {fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} "
            f"| {fmt(row['server_cpu_ms_per_call'], 2)} | {fmt(row['lm_max_in_flight'])} "
            f"| {fmt(row['server_pss_mib'], 0)} | {row['errors']} |"
        )
    return "\n".join(lines)


def cores_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| server | callers | machine cores busy | server | its busiest process | fake LM "
        "| load generator | anything else | fake LM CPU ms/call | load generator CPU ms/call |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['callers']} | {fmt(row['busy_cores'], 2)} "
            f"| {fmt(row['server_cores'], 2)} | {fmt(row['server_busiest_cores'], 2)} "
            f"| {fmt(row['lm_cores'], 2)} "
            f"| {fmt(row['bench_cores'], 2)} | {fmt(row['other_cores'], 2)} "
            f"| {fmt(row['lm_cpu_ms_per_call'], 2)} | {fmt(row['bench_cpu_ms_per_call'], 2)} |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], latency_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = list(OrderedDict((r["label"], None) for r in rows))
    callers = sorted({r["callers"] for r in rows})
    by_key = {(r["label"], r["callers"]): r for r in rows}
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    width = 0.8 / max(1, len(labels))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    panels = [
        ("calls_per_s", "calls/s (median, whisker: rounds)", "Throughput"),
        ("server_cpu_ms_per_call", "server CPU ms per call", "CPU per call (whole server tree)"),
        ("p50_ms", "p50 latency, ms (log)", "Median latency"),
    ]
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, label in enumerate(labels):
            xs, ys, lows, highs = [], [], [], []
            for j, c in enumerate(callers):
                row = by_key.get((label, c))
                if row is None or row[key] is None:
                    continue
                values = [f[key] for f in row["per_round"] if f[key] is not None]
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(row[key])
                lows.append(row[key] - min(values))
                highs.append(max(values) - row[key])
            ax.bar(xs, ys, width * 0.9, color=colors[i % len(colors)], label=label)
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", ecolor="black", capsize=3, lw=1)
            for x, y, high in zip(xs, ys, highs):
                text = f"{y:.0f}" if y >= 10 else f"{y:.1f}"
                ax.annotate(text, (x, y + high), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
        if key == "calls_per_s":
            for j, c in enumerate(callers):
                limit = c / (latency_ms / 1000.0)
                ax.hlines(limit, j - 0.45, j + 0.45, colors="gray", linestyles="dashed")
                ax.annotate(f"limit {limit:.0f}/s", (j, limit), ha="center", va="bottom",
                            fontsize=8, color="gray", xytext=(0, 2), textcoords="offset points")
        if key == "p50_ms":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(callers)))
        ax.set_xticklabels([f"{c} callers" for c in callers])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="center left")
    fig.suptitle(
        f"DSPy question -> answer against a fake LM answering after {latency_ms:.0f} ms "
        "(2 cores, nothing pinned)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(meta: Dict[str, Any], rows: List[Dict[str, Any]], image: str) -> str:
    latency = float(meta["latency_ms"])
    duration = meta["duration"]
    table = markdown_table(rows, latency)
    cores = cores_table(rows)
    callers = sorted({r["callers"] for r in rows})
    limits = ", ".join(f"{c / (latency / 1000.0):.0f}/s at {c} callers" for c in callers)
    every = [f for r in rows for f in r["per_round"]]
    calls = sum(f["calls"] for f in every)
    matching = sum(f["answers_matching"] or 0 for f in every)
    fastapi = [r for r in rows if r["side"] == "fastapi"]
    snake = [r for r in rows if r["side"] == "snakepool"]
    lines = [
        MARKER,
        "",
        TITLE,
        "",
        f"Generated by `scripts/lm-serving-bench.sh` on {meta['date']} ({meta['elapsed_s']:.0f} s "
        f"in all). snakepool {meta['git']}; Python {meta['python']}, DSPy {meta['dspy']}, "
        f"litellm {meta['litellm']}, FastAPI {meta['fastapi']}, uvicorn {meta['uvicorn']}. "
        f"Load average {meta['load_before']} before the run, {meta['load_after']} after.",
        "",
        f"![LM-bound serving](docs/bench/{image})",
        "",
        "Both servers run the same DSPy program, "
        + ("`dspy.Predict" if meta["program"] == "predict" else "`dspy.ChainOfThought")
        + f"(\"question -> answer\")` (`{meta['program']}`) with the model "
        f"`{meta.get('model', 'openai/fake')}`, against the same fake OpenAI-compatible LM on "
        "127.0.0.1 "
        f"(`benches/lm_serving/fake_lm.py`, aiohttp) that answers every chat completion after "
        f"**{latency:.0f} ms** in ChatAdapter format (the sum asked for), with DSPy's response "
        "cache off on both sides:",
        "",
        f"- **FastAPI + uvicorn**: DSPy's deployment tutorial (`benches/lm_serving/fastapi_app.py`): "
        f"`uvicorn --workers {meta['uvicorn_workers']}`, one `dspy.LM(MODEL, api_base=..., "
        "cache=False)` and one program per worker process, built at import, and an async "
        "endpoint that awaits `program.acall(question=...)`. Plain `pip install fastapi uvicorn` "
        "as in the tutorial (asyncio loop, h11), access log off. To be driven by the same load "
        "generator it answers snakepool's `POST /v1/call` body; the per-session setup calls "
        "answer at once.",
        "- **snakepool serve**: the release build, `--workers N --preload dspy "
        f"--max-concurrency {meta.get('max_concurrency', 32)}` (each worker runs up to that many "
        "`execute_program` calls at once on its event loop, with DSPy's `acall`), workers forked "
        "from the zygote, `--lm-profile fake:model=MODEL,api_base=...,api_key_env=...` "
        f"and `--checkout-timeout {meta['checkout_timeout']}` (so that no call fails waiting in "
        "the queue: the wait shows in the latency). Each session runs `configure_lm "
        "{\"profile\": \"fake\"}` and `create_program` once, then every call is "
        "`execute_program` on its program in its session's worker.",
        "",
        f"The load: `snakepool bench --url URL --dspy-profile fake --concurrency C "
        f"--duration {duration} --json`, one session per caller, each caller calling in a "
        "loop with a new question each time (\"What is A plus B?\"; "
        f"{matching:,} of the {calls:,} counted answers were A + B). One uncounted warm-up "
        "call per caller first. The rounds alternate "
        "the servers, each server started anew per round, then loaded with each number of "
        "callers in turn. Figures are the median of "
        f"{meta['rounds']} rounds, every round's value beside it. The theoretical limit is "
        f"callers ÷ latency: {limits}.",
        "",
        table,
        "",
        "*Server CPU ms/call*: user + system time of the whole server process tree (uvicorn's "
        "master and workers; `snakepool serve`, its zygote and workers), summed from "
        "`/proc/PID/stat` over every process in the tree at the start and end of the counted "
        "calls, divided by the calls. *LM calls in flight*: the most chat completions the "
        "fake LM was answering at once during the load. *PSS*: the sum of `Pss` in "
        "`/proc/PID/smaps_rollup` over the tree at the end of each load (the "
        f"{callers[0]}-caller rows: what that server needs to serve {callers[0]} callers).",
        "",
        "**Cores.** The machine has "
        f"{meta['cores']} cores and nothing is pinned: the server under test, the fake LM and "
        "the load generator (`snakepool bench`, a tokio runtime) all share them, and the "
        "scheduler places them. The servers take turns; only one runs at a time. Average "
        "cores each part kept busy during the counted calls (*its busiest process*: the one "
        "process of the server's tree that used the most CPU; *anything else*: the rest of the "
        "machine's busy time from `/proc/stat`, i.e. processes outside this benchmark):",
        "",
        cores,
        "",
    ]
    notes = []
    for row in snake:
        inflight = row["lm_max_in_flight"]
        if inflight is not None and row["workers"] is not None and inflight <= row["workers"]:
            bound = row["workers"] / (latency / 1000.0)
            notes.append(
                f"- **{row['label']}** never had more than {inflight:.0f} LM calls in flight: "
                f"with one call at a time per worker, {row['workers']} workers make at most "
                f"{row['workers']} ÷ {latency / 1000.0:g} s = {bound:.0f} calls/s whatever the "
                f"number of callers. It did {row['calls_per_s']:.1f}/s at {row['callers']} "
                f"callers, the others waiting in its queue (p50 {fmt(row['p50_ms'])} ms)."
            )
            continue
        other = next((r for r in fastapi if r["callers"] == row["callers"]), None)
        versus = ""
        if other and other["calls_per_s"]:
            versus = f" = **{row['calls_per_s'] / other['calls_per_s']:.2f}×** FastAPI's"
            if row["server_cpu_ms_per_call"] and other["server_cpu_ms_per_call"]:
                versus += (
                    f", at {row['server_cpu_ms_per_call'] / other['server_cpu_ms_per_call']:.2f}× "
                    "its CPU per call"
                )
            if row["server_pss_mib"] and other["server_pss_mib"]:
                versus += f" and {row['server_pss_mib'] / other['server_pss_mib']:.2f}× its memory (PSS)"
        limit = row["callers"] / (latency / 1000.0)
        notes.append(
            f"- **{row['label']}** at {row['callers']} callers: {row['calls_per_s']:.1f} calls/s "
            f"({row['calls_per_s'] / limit:.2f} of the limit){versus}; up to "
            f"{fmt(inflight)} LM calls in flight, {fmt(row['server_cpu_ms_per_call'], 2)} ms of "
            f"CPU per call."
        )
    for row in fastapi:
        limit = row["callers"] / (latency / 1000.0)
        cpu = row["server_cpu_ms_per_call"]
        ceiling = (
            f" At that CPU cost {meta['cores']} cores allow at most "
            f"{meta['cores'] * 1000.0 / cpu:.0f} calls/s for the server alone"
            if cpu
            else ""
        )
        others = row.get("other_cores")
        shared = (
            f"; other processes on the machine kept {others:.2f} cores busy meanwhile."
            if others is not None and others >= 0.1
            else "."
        )
        busiest = row.get("server_busiest_cores")
        uneven = ""
        if busiest is not None and row["server_cores"] and busiest > 0.6 * row["server_cores"]:
            uneven = (
                f" Its busiest worker process used {busiest:.2f} of those cores: uvicorn's "
                "workers share one listening socket, a connection belongs to whichever worker "
                "accepted it, and the load generator's keep-alive connections stay where they "
                "landed."
            )
        notes.append(
            f"- **{row['label']}** at {row['callers']} callers: {row['calls_per_s']:.1f} calls/s "
            f"({row['calls_per_s'] / limit:.2f} of the limit), up to "
            f"{fmt(row['lm_max_in_flight'])} LM calls in flight, "
            f"{fmt(cpu, 2)} ms of CPU per call on {fmt(row['server_cores'], 2)} cores."
            + uneven
            + ceiling
            + (shared if ceiling else "")
        )
    if meta.get("model", "openai/fake") == "openai/fake":
        notes.append(
            "- Both sides pay for the fake model's name: DSPy 3.4 looks the model up in its "
            "model-metadata table on every call (capabilities, price), and a name the table "
            "does not have, like `openai/fake`, is looked up by scanning all of its ~4,500 "
            "entries, which roughly doubles DSPy's own CPU time per call. A deployment names a "
            "known model; `LM_BENCH_MODEL=openai/gpt-4o-mini` measures with one (the fake LM "
            "answers any name)."
        )
    lines += ["What the figures say:", ""] + notes + [""]
    profile = Path(meta["out_dir"]) / "profile" / "summary.txt"
    if profile.exists():
        lines += [
            "**Where the CPU goes** (`scripts/lm-serving-profile.sh`, run after the rounds: "
            "64 callers on `snakepool serve`; the host process's CPU time from `/proc`, and a "
            "py-spy profile of one worker with its samples credited to the innermost frame of "
            "a known library, waiting threads left out):",
            "",
            "```text",
            profile.read_text(encoding="utf-8").strip(),
            "```",
            "",
            "The Rust host (HTTP, JSON, frames, scheduling) is a small part of a call's CPU; "
            "nearly all of it is in the worker, and there mostly in DSPy (formatting the "
            "prompt and parsing the answer, its settings and callbacks, its LM client) and "
            "in the asyncio loop serving the LM's HTTP connections. The worker runtime's own "
            "share (frames, dispatch, the bridge) is what snakepool adds to DSPy's own work.",
            "",
        ]
    lines += [
        "Reproduce (builds the release binary, installs `benches/lm_serving/requirements.txt` "
        "into `.venv` when missing, writes this section, the plot, and "
        f"`{meta['out_dir']}/lm_serving.json` and `.md`):",
        "",
        "```sh",
        "scripts/lm-serving-bench.sh",
        "```",
        "",
        f"This run: `{meta['command']}`. Settings (environment): "
        f"`LM_BENCH_ROUNDS={meta['rounds']}`, `LM_BENCH_CALLERS=\"{meta['callers']}\"`, "
        f"`LM_BENCH_DURATION={duration}`, `LM_BENCH_LATENCY_MS={latency:.0f}`, "
        f"`LM_BENCH_SNAKEPOOL_WORKERS=\"{meta['snakepool_workers']}\"`, "
        f"`LM_BENCH_MAX_CONCURRENCY={meta.get('max_concurrency', 32)}`, "
        f"`LM_BENCH_UVICORN_WORKERS={meta['uvicorn_workers']}`, "
        f"`LM_BENCH_PROGRAM={meta['program']}`, "
        f"`LM_BENCH_MODEL={meta.get('model', 'openai/fake')}`. `scripts/benchmarks.sh` rewrites the "
        "sections above and keeps this one as it is.",
        "",
    ]
    return "\n".join(lines)


def update_benchmarks(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARKER in current:
        current = current[: current.index(MARKER)]
    current = current.rstrip("\n") + "\n\n"
    path.write_text(current + text)


def render(args: argparse.Namespace) -> int:
    meta = json.loads(Path(args.meta).read_text())
    runs = load_results(Path(args.results))
    if not runs:
        print("no results", file=sys.stderr)
        return 1
    rows = aggregate(runs)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latency = float(meta["latency_ms"])
    (out / "lm_serving.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n"
    )
    table = markdown_table(rows, latency)
    (out / "lm_serving.md").write_text(table + "\n\n" + cores_table(rows) + "\n")
    image = Path(args.plot)
    plot(rows, latency, image)
    if args.benchmarks:
        update_benchmarks(Path(args.benchmarks), section(meta, rows, image.name))
    print(table)
    print()
    print(cores_table(rows))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="what", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--results", required=True)
    rec.add_argument("--side", required=True, choices=["fastapi", "snakepool"])
    rec.add_argument("--label", required=True)
    rec.add_argument("--workers", type=int, required=True)
    rec.add_argument("--round", type=int, required=True)
    rec.add_argument("--callers", type=int, required=True)
    rec.add_argument("--bench", required=True, help="the JSON of snakepool bench")
    rec.add_argument("--lm-before", required=True, help="the fake LM's /stats/reset answer")
    rec.add_argument("--lm-url", required=True)
    ren = commands.add_parser("render")
    ren.add_argument("--results", required=True)
    ren.add_argument("--meta", required=True)
    ren.add_argument("--out-dir", required=True)
    ren.add_argument("--plot", required=True)
    ren.add_argument("--benchmarks", help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    return record(args) if args.what == "record" else render(args)


if __name__ == "__main__":
    sys.exit(main())
