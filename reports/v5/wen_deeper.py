"""`wen` with a target under the detection threshold, on every benchmark set (v5).

`reports/v5/wen_budget.py` shows that on v5 the spec's `wen` (target = threshold, 10 iterations)
stops at a 68% cut because generations whose first-step score reaches the target still copy, and
that a target of 0.6 x threshold with up to 50 iterations cuts 84%. This measures what that costs:
the benchmark's rows (memorization, alignment, Frechet distance, time against `none` in the same
run) for `none` and `wen` at 0.6 x threshold with 10 and with 50 iterations. `wen` flags by the
threshold in every setting, so held-out prompts the detector passes stay bit-identical.
Usage: .venv/bin/python reports/v5/wen_deeper.py [MODEL] [SETS] [ITERS] [SCALES] > reports/v5/wen-deeper.jsonl
(about 15 min for every set with 10 and 50 iterations; SETS, ITERS and SCALES are comma lists, e.g.
verbatim 10 0.9,0.8; SCALES are targets as fractions of the threshold, default 0.6; MODEL "" is the
bundled model)
"""
from __future__ import annotations

import json
import sys

from memfree.bench.mitigate import SETS, evaluate_method
from memfree.model import load
from memfree.testbed.bundle import load_testbed

model = load(sys.argv[1] or None if len(sys.argv) > 1 else None)
tb = load_testbed(model)
threshold = model.defaults["detection"]["threshold"]
sets = sys.argv[2].split(",") if len(sys.argv) > 2 else SETS
iters = [int(n) for n in sys.argv[3].split(",")] if len(sys.argv) > 3 else [10, 50]
scales = [float(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0.6]
settings = [("none", {}, {})] + [("wen", {"target": scale * threshold, "max_iters": n}, {"target_scale": scale})
                                 for scale in scales for n in iters]
none_seconds = {}
for name in sets:
    for method, kw, label in settings:
        row = evaluate_method(model, tb, method, name, [0, 1, 2, 3], **kw)
        if method == "none":
            none_seconds[name] = row["seconds_per_image"]
        row["overhead_ratio"] = row["seconds_per_image"] / none_seconds[name]
        row.update(kw | label)
        print(json.dumps(row), flush=True)
