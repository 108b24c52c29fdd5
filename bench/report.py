"""What a run hands back: the JSON result, the table on stdout, the same as Markdown (for
docs/performance.md), and a PNG chart when matplotlib is installed."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import cluster_setup
from bench.common import MiB, REPO
from bench.rows import ROWS, targets
from bench.session import Bench


def result(bench: Bench, load0: tuple) -> dict:
    """The run's JSON: its rows in ROWS' order, the targets, the machine, the notes (load0: load average before)."""
    rows = []
    for g, k, label in ROWS:
        rows.append({"group": g, "key": k, "label": label, "value": bench.rows[(g, k)]})
    return {
        "mode": bench.mode, "params": bench.m, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - bench.started, "namespace": bench.ns,
        "machine": machine(), "agent_image": cluster_setup.AGENT_IMAGE, "agent_loop": bench.agent_loop,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "rows": rows, "targets": targets(bench.rows), "notes": bench.notes,
        **({"profiles": bench.profiles} if bench.profiles else {}),
    }


def machine() -> dict:
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_GiB": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "commit": git.stdout.strip()}


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def cell(group: str, v: Any) -> str:
    if not isinstance(v, dict):
        return str(v)
    if group in ("latency", "grpc", "hol"):
        s = f"p50 {fmt(v.get('p50_ms'), 3)}  p99 {fmt(v.get('p99_ms'), 3)}  max {fmt(v.get('max_ms'), 1)} ms"
        if v.get("idle_ms") is not None:
            s += f"  after idle {fmt(v['idle_ms'], 3)} ms"
        if "bulk_MBps_during" in v:
            s += f"  (bulk {fmt(v['bulk_MBps_during'], 1)} MB/s meanwhile)"
        s += f"  n={v.get('n')} err={v.get('errors')}"
        return s
    if group == "bulk":
        return f"down {fmt(v['down_MBps'], 1)} MB/s  up {fmt(v['up_MBps'], 1)} MB/s  ({v['bytes'] // MiB} MiB each way)"
    if group == "throughput":
        s = f"{fmt(v['rps'], 0)} req/s  ({v['conns']} conns, err={v['errors']}, p50 {fmt(v.get('p50_ms'), 2)} ms)"
        if v.get("cpu_us_per_req"):
            s += "  CPU us/req: " + ", ".join(f"{k} {x:.0f}" for k, x in v["cpu_us_per_req"].items())
        if v.get("machine_cores"):
            mc = v["machine_cores"]
            s += f"  machine busy {mc['machine']:.2f} cores (softirq {mc['softirq']:.2f}, steal {mc['steal']:.2f})"
        return s
    if group == "concurrency":
        return (f"{fmt(v['rps'], 0)} req/s of {v['rate_target']}  err={v['errors']}  p50 {fmt(v['p50_ms'], 2)}  "
                f"p99 {fmt(v['p99_ms'], 2)} ms  ({v['conns']} conns x {v['seconds']} s)")
    if group == "mount":
        if "MBps" in v:
            return f"{fmt(v['MBps'], 1)} MB/s  ({v['bytes'] // MiB} MiB)"
        return f"{v['files']} files in {fmt(v['seconds'], 2)} s  ({fmt(v['us_per_file'], 0)} us/file)"
    if group == "setup":
        return f"{fmt(v['seconds'], 1)} s"
    if group == "up":  # median, mean +- its standard error, every run, and where the time of `up` went
        s = f"{fmt(v['seconds'], 2)} s"
        if "sem" in v:
            s += f", mean {fmt(v['mean'], 2)} +- {fmt(v['sem'], 2)}"
        s += f"  (runs {', '.join(f'{x:.2f}' for x in v['runs'])})"
        if v.get("phases"):
            s += "  phases: " + ", ".join(f"{k} {fmt(x, 2)}" for k, x in v["phases"].items())
        return s
    if "MiB" in v:
        return f"{fmt(v['MiB'], 1)} MiB"
    if "cpu_s_per_GB" in v:
        return f"{fmt(v['cpu_s_per_GB'], 2)} CPU s/GB"
    return json.dumps(v)


def table(res: dict) -> str:
    lines = [f"tpenv bench, mode {res['mode']}, {res['started']}, {res['duration_s']:.0f} s, "
             f"{res['machine']['cpus']} CPUs, commit {res['machine']['commit']}, "
             f"load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}"
             + (f", agent event loop {res['agent_loop']}" if res.get("agent_loop") else "")]
    group = None
    for r in res["rows"]:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"\n[{group}]")
        lines.append(f"  {r['label']:<66} {cell(r['group'], r['value'])}")
    for name, prof in res.get("profiles", {}).items():
        busy = f", busy {prof['busy']:.0%} of the step" if prof.get("busy") is not None else ""
        lines.append(f"\nprofile {name} ({prof['samples']} busy samples{busy}), most time on top of the stack:")
        for fn, share in prof["self"][:6]:
            lines.append(f"  {share:6.1%}  {fn}")
    for n in res["notes"]:
        lines.append(f"\nnote: {n}")
    lines.append("\n[targets]")
    for t in res["targets"]:
        lines.append(f"  {t['target']:<56} {fmt(t['measured'], 3):>10}  want {t['wanted']:<8} {t['status']}"
                     + (f" ({t['missing']})" if t.get("missing") else "")
                     + (f"  (by round: {', '.join(f'{x:.2f}' for x in t['rounds'])}; median {t['median_round']:.2f})"
                        if t.get("rounds") else ""))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The table as Markdown (for docs/performance.md)."""
    m = res["machine"]
    out = [f"Run `{res['mode']}` of {res['started']} ({res['duration_s']:.0f} s), commit `{m['commit']}`, "
           f"{m['cpus']} CPUs ({m['cpu_model']}), {m['mem_GiB']} GiB, Linux {m['kernel']}, Python {m['python']}; "
           f"load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}.", ""]
    group = None
    for r in res["rows"]:
        if r["group"] != group:
            group = r["group"]
            out += ["", f"**{group}**", "", "| path | figure |", "|---|---|"]
        out.append(f"| {r['label']} | {cell(r['group'], r['value']).replace('|', '/')} |")
    out += ["", "**targets**", "", "| target | measured | wanted | |", "|---|---|---|---|"]
    for t in res["targets"]:
        out.append(f"| {t['target']} | {fmt(t['measured'], 3)} | {t['wanted']} | {t['status']} |")
    for n in res["notes"]:
        out += ["", f"Note: {n}"]
    return "\n".join(out) + "\n"


def chart(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    rows = {(r["group"], r["key"]): r["value"] for r in res["rows"]}
    names = {"loopback": "(c) loopback", "port_forward": "(b) port-fwd", "direct": "(a) in-cluster",
             "passthrough": "(d) passthrough", "haproxy": "(e) HAProxy", "intercept": "intercept", "header_matched": "hdr matched",
             "header_unmatched": "hdr unmatched", "mirror_baseline": "mirror base", "mirror_handler_up": "mirror up",
             "mirror_handler_stopped": "mirror stopped", "mirror_stopped_unmatched": "mirror unmatched"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    paths = {g: [(names[k], v) for (gg, k), v in rows.items() if gg == g and isinstance(v, dict)]
             for g in ("latency", "bulk", "concurrency")}
    paired_bars(axes[0], paths["latency"], ("p50_ms", "p50"), ("p99_ms", "p99"), "ms (log)",
                "1 KiB request latency (keep-alive, fixed rate)", {})
    paired_bars(axes[1], paths["bulk"], ("down_MBps", "server -> caller"), ("up_MBps", "caller -> server"),
                "MB/s (log)", "bulk transfer", {"fontsize": 8})
    conc = paths["concurrency"]
    ax = axes[2]
    xs = range(len(conc))
    # A step where every request failed has no p99: a zero bar, its errors written above it.
    ax.bar(list(xs), [v.get("p99_ms") or 0 for _, v in conc], 0.6)
    for x, (_, v) in zip(xs, conc):
        ax.text(x, v.get("p99_ms") or 0, f"{v['rps']:.0f}/s\nerr {v['errors']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [n for n, _ in conc], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("p99 ms")
    p = res["params"]
    ax.set_title(f"{p['conc_conns']} connections, {p['conc_rate']} req/s target")
    fig.suptitle(f"tpenv bench ({res['mode']}, {res['started']}, {res['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None



def paired_bars(ax: Any, paths: list[tuple[str, dict]], left: tuple[str, str], right: tuple[str, str],
                ylabel: str, title: str, legend: dict) -> None:
    """Two figures of each path side by side ((key, label) each), on a log scale: the spread between
    the paths is orders of magnitude (loopback against a tunnel)."""
    xs = range(len(paths))
    ax.bar([x - 0.2 for x in xs], [v[left[0]] for _, v in paths], 0.4, label=left[1])
    ax.bar([x + 0.2 for x in xs], [v[right[0]] for _, v in paths], 0.4, label=right[1])
    ax.set_xticks(list(xs), [n for n, _ in paths], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**legend)
