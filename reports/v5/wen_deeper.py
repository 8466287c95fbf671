"""`wen` with a target under the detection threshold, on every benchmark set (v5).

`reports/v5/wen_budget.py` shows that on v5 the spec's `wen` (target = threshold, 10 iterations)
stops at a 68% cut because generations whose first-step score reaches the target still copy, and
that a target of 0.6 x threshold with up to 50 iterations cuts 84%. This measures what that costs:
the benchmark's rows (memorization, alignment, Frechet distance, time against `none` in the same
run) for `none` and `wen` at 0.6 x threshold with 10 and with 50 iterations. `wen` flags by the
threshold in every setting, so held-out prompts the detector passes stay bit-identical.
Usage: .venv/bin/python reports/v5/wen_deeper.py [MODEL] > reports/v5/wen-deeper.jsonl  (about 15 min)
"""
from __future__ import annotations

import json
import sys

from memfree.bench.mitigate import SETS, evaluate_method
from memfree.model import load
from memfree.testbed.bundle import load_testbed

model = load(sys.argv[1] if len(sys.argv) > 1 else None)
tb = load_testbed(model)
target = 0.6 * model.defaults["detection"]["threshold"]
settings = [("none", {}), ("wen", {"target": target, "max_iters": 10}), ("wen", {"target": target, "max_iters": 50})]
none_seconds = {}
for name in SETS:
    for method, kw in settings:
        row = evaluate_method(model, tb, method, name, [0, 1, 2, 3], **kw)
        if method == "none":
            none_seconds[name] = row["seconds_per_image"]
        row["overhead_ratio"] = row["seconds_per_image"] / none_seconds[name]
        row.update({k: kw[k] for k in ("target", "max_iters") if k in kw})
        print(json.dumps(row), flush=True)
