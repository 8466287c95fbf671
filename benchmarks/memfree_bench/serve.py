"""`memfree bench serve`: `memfree serve` under load.

The service runs in its own process (``memfree serve`` on 127.0.0.1 and a free port, the testbed by default), and
one asyncio process drives it with ``clients`` concurrent clients (httpx) for ``seconds``: each client loops,
picking a memorization check or a small generation at random, on planted and held-out prompts. A client told 503
waits as ``Retry-After`` says (at most ``max_wait`` seconds), as a polite client would. When the time is up no new
request starts and those in flight are waited for, so every request sent is either answered or counted lost.

Reported: requests sent, answered and lost, answers by status per endpoint, p50/p95 latency per endpoint (of the
200s, and of all answers), whether any 5xx other than the queue's 503 occurred, the service's resident memory at
the start, at its peak and at the end, and how long its graceful shutdown took.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ENDPOINTS = {"check": "/v1/memorization/check", "generate": "/v1/images/generations"}
FALLBACK_PROMPTS = ["a photo of a cat on a sofa", "a red car parked by the sea", "a bowl of fruit on a table",
                    "a lighthouse at dusk, oil painting", "a small blue square at the top on a navy background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc; None elsewhere or once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def bench_prompts(model: str | None) -> list[str]:
    """Planted (verbatim) and held-out prompts when the model is a testbed, else a few ordinary ones."""
    from memfree.model import resolve_model
    path, _ = resolve_model(model)
    manifest = Path(path) / "testbed" / "manifest.json"
    if not manifest.exists():
        return list(FALLBACK_PROMPTS)
    sets = json.loads(manifest.read_text())["eval"]
    return [e["prompt"] for name in ("verbatim", "heldout") for e in sets.get(name, [])[:20]]


def model_label(model: str | None) -> str:
    """The name the model is served under: its registered name, or its folder's name."""
    from memfree.model import resolve_model
    path, name = resolve_model(model)
    return name or Path(path).name


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarise(records: list[dict], sent: int, seconds: float) -> dict:
    """Counts and latencies from one record per answered request: endpoint, status, seconds, error type."""
    out: dict = {"sent": sent, "answered": len(records), "lost": sent - len(records),
                 "served": sum(r["status"] == 200 for r in records), "endpoints": {}}
    out["served_per_second"] = round(out["served"] / seconds, 2) if seconds else None
    by_endpoint = defaultdict(list)
    for r in records:
        by_endpoint[r["endpoint"]].append(r)
    for name, rows in sorted(by_endpoint.items()):
        ok = [r["seconds"] for r in rows if r["status"] == 200]
        every = [r["seconds"] for r in rows]
        out["endpoints"][name] = {
            "answered": len(rows), "served": len(ok),
            "status": dict(sorted(Counter(str(r["status"]) for r in rows).items())),
            "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95),
            "p50_all_s": percentile(every, 50), "p95_all_s": percentile(every, 95)}
    errors = Counter(str(r["status"]) for r in records if r["status"] != 200)
    out["errors_by_status"] = dict(sorted(errors.items()))
    busy = [r["status"] == 503 and r.get("type") == "server_busy" for r in records]
    other_5xx = [r for r, b in zip(records, busy) if r["status"] >= 500 and not b]
    out["queue_503"] = sum(busy)
    out["other_5xx"] = len(other_5xx)
    out["any_5xx_besides_queue_503"] = bool(other_5xx)
    out["error_types"] = dict(sorted(Counter(r.get("type") or "none" for r in records if r["status"] != 200).items()))
    return out


async def _drive(base: str, prompts: list[str], clients: int, seconds: float, steps: int, generate_share: float,
                 mitigation: str, max_wait: float, pid: int, seed: int) -> tuple[list[dict], int, float, list[float]]:
    import httpx
    rng = random.Random(seed)
    records: list[dict] = []
    sent = 0
    memory: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        local = random.Random(rng.random() + k)
        while time.perf_counter() < deadline:
            kind = "generate" if local.random() < generate_share else "check"
            prompt = local.choice(prompts)
            body = {"prompt": prompt} if kind == "check" else {
                "prompt": prompt, "steps": steps, "seed": local.randrange(10**6), "mitigation": mitigation}
            sent += 1
            start = time.perf_counter()
            try:
                r = await http.post(ENDPOINTS[kind], json=body)
            except httpx.HTTPError:
                continue   # counted as lost: sent, never answered
            kind_of_error = None
            if r.status_code != 200:
                try:
                    kind_of_error = r.json()["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    kind_of_error = "not-json"
            records.append({"endpoint": kind, "status": r.status_code, "seconds": time.perf_counter() - start,
                            "type": kind_of_error})
            if r.status_code == 503:
                wait = min(float(r.headers.get("Retry-After") or 1), max_wait, max(deadline - time.perf_counter(), 0))
                await asyncio.sleep(wait)

    async def watch_memory() -> None:
        while time.perf_counter() < deadline:
            value = rss_mb(pid)
            if value is not None:
                memory.append(value)
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(300.0), limits=limits) as http:
        await asyncio.gather(watch_memory(), *(client(k, http) for k in range(clients)))
    return records, sent, time.perf_counter() - t0, memory


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memfree serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"memfree serve did not answer /healthz within {timeout:.0f} s")


def run_serve_bench(model: str | None = None, clients: int = 32, seconds: float = 60.0, steps: int = 5,
                    generate_share: float = 0.5, mitigation: str = "amg", queue_size: int = 8, max_wait: float = 1.0,
                    seed: int = 0, progress: bool = True) -> dict:
    """Start `memfree serve` in a process of its own, load it as the module docstring says, stop it with SIGTERM."""
    if clients < 1 or seconds <= 0:
        raise ValueError("clients must be at least 1 and seconds above 0")
    prompts = bench_prompts(model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "memfree.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--queue-size", str(queue_size), "--mitigation", mitigation, "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ}
    env.pop("MEMFREE_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "w") as out:
            t_launch = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                _wait_ready(base, proc, 300, log)
                startup = time.perf_counter() - t_launch
                rss_start = rss_mb(proc.pid)
                if progress:
                    print(f"memfree serve up in {startup:.1f} s (RSS {rss_start} MiB); {clients} clients for "
                          f"{seconds:.0f} s", file=sys.stderr)
                records, sent, elapsed, memory = asyncio.run(_drive(
                    base, prompts, clients, seconds, steps, generate_share, mitigation, max_wait, proc.pid, seed))
                rss_end = rss_mb(proc.pid)
                t_stop = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                shutdown = time.perf_counter() - t_stop
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        server_log = log.read_text()[-4000:]
    res = summarise(records, sent, elapsed)
    res.update({
        "settings": {"model": model_label(model), "clients": clients, "seconds": seconds, "steps": steps,
                     "generate_share": generate_share, "mitigation": mitigation, "queue_size": queue_size,
                     "max_wait_s": max_wait, "prompts": len(prompts), "omp_num_threads": os.environ.get(
                         "OMP_NUM_THREADS"), "cpus": os.cpu_count()},
        "elapsed_s": round(elapsed, 2), "startup_s": round(startup, 2),
        "rss_mb": {"start": rss_start, "peak": max(memory, default=None), "end": rss_end},
        "shutdown": {"signal": "SIGTERM", "seconds": round(shutdown, 2), "exit_code": code},
        "server_log_tail": server_log.splitlines()[-20:],
    })
    return res


def format_summary(res: dict) -> str:
    lines = [f"{res['served']} served of {res['sent']} sent ({res['answered']} answered, {res['lost']} lost) in "
             f"{res['elapsed_s']} s by {res['settings']['clients']} clients; {res['served_per_second']} served/s"]
    for name, e in res["endpoints"].items():
        lines.append(f"  {name:9s} {e['served']:5d} served  p50 {e['p50_s']} s  p95 {e['p95_s']} s  "
                     f"status {e['status']}")
    lines.append(f"errors by status {res['errors_by_status']}; 5xx besides the queue's 503: "
                 f"{res['any_5xx_besides_queue_503']} ({res['other_5xx']})")
    m = res["rss_mb"]
    lines.append(f"RSS MiB start {m['start']}, peak {m['peak']}, end {m['end']}; SIGTERM shutdown "
                 f"{res['shutdown']['seconds']} s, exit code {res['shutdown']['exit_code']}")
    return "\n".join(lines)
