"""Does `wen` generalise better when each embedding must pass several starting noises?

The reference code optimises one embedding for a batch of n images of a prompt (its loss is the
Frobenius norm over the batch). memfree's `wen` optimises per image at that image's x_T only; on v5 the
generations that reach the target still copy in 40% of cases. This runs the benchmark's verbatim
generations (prompt i, seed 1000·s + i, s = 0..3) under `none` and under `wen` with n = 1, 2, 4, 8
noises per embedding (the score is then the root mean square over them), and prints JSON lines.
Usage: .venv/bin/python reports/v5/wen_noises.py [MODEL] [SET] [N,N,...]
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from memfree.mitigate import generate
from memfree.model import load
from memfree.testbed.bundle import load_testbed

model = load(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None)
prompt_set = sys.argv[2] if len(sys.argv) > 2 else "verbatim"
counts = [int(n) for n in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 2, 4, 8]
tb = load_testbed(model)
prompts = tb.prompts(prompt_set)
threshold = model.defaults["detection"]["threshold"]
for method, noises in [("none", 1)] + [("wen", n) for n in counts]:
    t0 = time.perf_counter()
    reports = [r for s in range(4) for r in
               generate(model, prompts, method, seed=1000 * s, index=tb.index, progress=False,
                        noises=noises).reports]
    copied = np.array([r.memorized for r in reports])
    reached = np.array([r.final_loss is not None and r.final_loss < threshold for r in reports])
    row = {"method": method, "noises": noises, "prompt_set": prompt_set, "generations": len(reports),
           "memorization_rate": float(copied.mean()),
           "applied": int(sum(r.applied for r in reports)),
           "mean_iterations": float(np.mean([r.iterations for r in reports])),
           "mean_score_after": float(np.mean([r.score_after for r in reports])),
           "reached_target": int(reached.sum()),
           "rate_reached": float(copied[reached].mean()) if reached.any() else None,
           "mean_nl2": float(np.mean([r.nl2 for r in reports])),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
