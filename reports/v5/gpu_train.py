"""Train several testbed runs side by side on one GPU inside a fixed time box, and pack the finished models.

Usage (repository root, on the GPU machine):
    python3 reports/v5/gpu_train.py OUT DEADLINE_S TOKENIZER_DIR NAME:DATA[:TAU] ...
(reports/v5/gpu_prepare.sh says what to carry; DATA and TOKENIZER_DIR can be the bundled model's
testbed/ and tokenizer/ folders)
Runs are listed most important first. Each is `memfree.testbed.train.train` on cuda (the recipe of
`memfree testbed train`, 10,000 steps) in its own process. When the runs' measured pace says the
last-listed one cannot finish by the deadline, it is stopped so the others keep the GPU. A finished
run's model (without its tokenizer, which is the same for every run) and train_state.json go into
OUT/NAME.tar.partXX, 15 MiB pieces. The alignment probe and ground truth are attached afterwards, on
the CPU, with `finish_model`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

STEPS = int(os.environ.get("STEPS", 10000))
PIECE = 15 * 2**20


def worker(name: str, data: str, tau: str, run_dir: str) -> None:
    from functools import partial
    from memfree.mitigate import keep_mask
    from memfree.testbed.train import train
    keep = partial(keep_mask, threshold=float(tau)) if tau else None
    train(data, run_dir, steps=STEPS, quiet=True, keep_mask_fn=keep, device=os.environ.get("DEVICE", "cuda"))
    (Path(run_dir) / "DONE").write_text(name)


def progress(run_dir: Path) -> tuple[int, float]:
    """(steps done, seconds spent in steps) at the run's last checkpoint."""
    try:
        state = json.loads((run_dir / "train_state.json").read_text())
        return state["step"], state["elapsed_s"]
    except (OSError, ValueError, KeyError):
        return 0, 0.0


def pack(name: str, run_dir: Path, out: Path, model_dir: Path) -> list[str]:
    tar_path = run_dir / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for part in ("unet", "text_encoder", "scheduler", "model_index.json", "memfree.json"):
            tar.add(model_dir / part, arcname=f"{name}/model/{part}")
        tar.add(run_dir / "train_state.json", arcname=f"{name}/train_state.json")
    data, pieces = tar_path.read_bytes(), []
    for i in range(0, len(data), PIECE):
        piece = out / f"{name}.tar.part{i // PIECE:02d}"
        piece.write_bytes(data[i:i + PIECE])
        pieces.append(piece.name)
    return pieces


def main() -> None:
    out, deadline, tok_dir, specs = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    t0 = time.time()
    runs = []
    for spec in specs:
        name, data, *rest = spec.split(":")
        run_dir = Path("/tmp/gpu-runs") / name
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tok_dir, run_dir / "tokenizer_build", dirs_exist_ok=True)
        with open(run_dir / "worker.log", "w") as log:  # the child keeps its own handle
            proc = subprocess.Popen([sys.executable, __file__, "--worker", name, data, rest[0] if rest else "",
                                     str(run_dir)], stdout=log, stderr=subprocess.STDOUT)
        runs.append({"name": name, "dir": run_dir, "proc": proc, "state": "running"})
    summary = {"steps": STEPS, "runs": {}}
    while any(r["state"] == "running" for r in runs):
        time.sleep(10)
        now = time.time() - t0
        live = [r for r in runs if r["state"] == "running"]
        line = []
        for r in live:
            (step, spent), code = progress(r["dir"]), r["proc"].poll()
            if code is not None:
                r["state"] = "done" if (r["dir"] / "DONE").exists() else f"failed ({code})"
                r["ended_s"] = now
                if r["state"] != "done":
                    print((r["dir"] / "worker.log").read_text()[-3000:], flush=True)
            # finish time from the measured seconds per step (the start-up is not a step)
            r["eta"] = now + 1.05 * (STEPS - step) * spent / step if step else None
            line.append(f"{r['name']} {step}/{STEPS}" + (f" eta {r['eta']:.0f}s" if r["eta"] else ""))
        print(f"[{now:5.0f}s] " + " | ".join(line), flush=True)
        live = [r for r in runs if r["state"] == "running"]
        # Drop the least important run while the pace says the slowest will not make the deadline.
        if len(live) > 1 and all(r.get("eta") for r in live) and max(r["eta"] for r in live) > deadline:
            victim = live[-1]
            victim["proc"].kill()
            victim["state"] = f"stopped at step {progress(victim['dir'])[0]} to make room"
            victim["ended_s"] = now
            print(f"stopping {victim['name']}: {victim['state']}", flush=True)
        elif now > deadline + 30:
            for r in live:
                r["proc"].kill()
                r["state"] = f"out of time at step {progress(r['dir'])[0]}"
                r["ended_s"] = now
    for r in runs:
        info = {"state": r["state"], "wall_s": round(r.get("ended_s", time.time() - t0))}  # when it ended
        if r["state"] == "done":
            info |= {"train_seconds": progress(r["dir"])[1], "pieces": pack(r["name"], r["dir"], out, r["dir"] / "model")}
        elif r["state"].startswith("out of time") and progress(r["dir"])[0]:  # a preview beats nothing
            from memfree.testbed.train import export_checkpoint
            info["pieces"] = pack(r["name"] + "-preview", r["dir"], out, export_checkpoint(r["dir"]))
        summary["runs"][r["name"]] = info
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    else:
        main()
