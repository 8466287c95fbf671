"""Why `wen` cuts verbatim memorization by 68% and not 80% on v5: is it the 10-iteration cap or the target?

Generates the verbatim captions with the benchmark's seeds (prompt i, seed 1000·s + i, s = 0..3) under
`none` and under `wen` with the spec's settings and with a larger budget or a lower target, and splits
each run's copies by whether the optimisation reached its target. Writes JSON lines to stdout.
Usage: .venv/bin/python reports/v5/wen_budget.py [MODEL]   (about 12 min on 2 cores)
"""
from __future__ import annotations

import json
import sys

import numpy as np

from memfree.mitigate import generate
from memfree.model import load
from memfree.testbed.bundle import load_testbed

model = load(sys.argv[1] if len(sys.argv) > 1 else None)
tb = load_testbed(model)
prompts = [e["prompt"] for e in tb.eval_sets["verbatim"]]
threshold = model.defaults["detection"]["threshold"]
settings = [("none", {}), ("wen", {}), ("wen", {"max_iters": 20}), ("wen", {"max_iters": 50}),
            ("wen", {"target": 0.8 * threshold}), ("wen", {"target": 0.8 * threshold, "max_iters": 50}),
            ("wen", {"target": 0.6 * threshold, "max_iters": 50})]
for method, kw in settings:
    reports = [r for s in range(4) for r in
               generate(model, prompts, method, seed=1000 * s, index=tb.index, progress=False, **kw).reports]
    copied = np.array([r.memorized for r in reports])
    target = kw.get("target", threshold)
    reached = np.array([r.score_after < target for r in reports])
    row = {"method": method, "max_iters": kw.get("max_iters", 10) if method == "wen" else None,
           "target": round(target, 4) if method == "wen" else None, "generations": len(reports),
           "memorization_rate": float(copied.mean()),
           "mean_iterations": float(np.mean([r.iterations for r in reports])),
           "mean_score_after": float(np.mean([r.score_after for r in reports])),
           "reached_target": int(reached.sum()),
           "copies_reached_target": int((copied & reached).sum()),
           "copies_missed_target": int((copied & ~reached).sum()),
           "rate_reached": float(copied[reached].mean()) if reached.any() else None,
           "rate_missed": float(copied[~reached].mean()) if (~reached).any() else None}
    print(json.dumps(row), flush=True)
