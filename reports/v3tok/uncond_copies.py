"""How often the bundled model copies a planted image from the empty prompt (no text at all).

Usage: python reports/v3tok/uncond_copies.py [MODEL] > reports/v3tok/uncond-copies.json
(MODEL defaults to the bundled testbed.)
A copy here cannot be undone by anything that edits the prompt or its embedding (wen and the
Somepalli baselines): it is the floor for text-side mitigations on this testbed.
"""
import json
import sys
from collections import Counter

import memfree
from memfree.sampling import sample
from memfree.testbed.bundle import load_testbed

model = memfree.load(sys.argv[1] if len(sys.argv) > 1 else None)
tb = load_testbed(model)
result = {}
for name, seeds in (("seeds 0-19", list(range(20))), ("seeds 0-199", list(range(200)))):
    out = sample(model, [""] * len(seeds), seeds, progress=False)
    nn = tb.index.search(out.images)
    kinds = Counter(tb.manifest["unique"][int(i)]["kind"] for i, m in zip(nn.ids, nn.memorized) if m)
    result[name] = {"generations": len(seeds), "memorized": float(nn.memorized.float().mean()), "copies_by_kind": kinds}
print(json.dumps(result, indent=1))
