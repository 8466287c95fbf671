"""wen at lower targets than the calibrated threshold on the bundled testbed: the 20 verbatim captions,
seed 0, one generation each. Output (2026-11-30): target 0.6 -> 0.85 memorized, 0.45 -> 0.80, 0.3 -> 0.50
(`none` on the same generations: 0.95, reports/v3tok/amg-sweep.jsonl)."""
import json

import memfree
from memfree.mitigate import generate
from memfree.testbed.bundle import load_testbed

model = memfree.load()
tb = load_testbed(model)
entries = tb.eval_sets["verbatim"]
for target in (0.6, 0.45, 0.3):
    g = generate(model, [e["prompt"] for e in entries], "wen", seed=0, index=tb.index, target=target, progress=False)
    n = len(entries)
    print(json.dumps({"target": target, "memorization": sum(r.memorized for r in g.reports) / n,
                      "applied": sum(r.applied for r in g.reports) / n,
                      "iterations": sum(r.iterations for r in g.reports) / n,
                      "score_after": sum(r.score_after for r in g.reports) / n}))
