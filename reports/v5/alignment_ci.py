"""How sure is the trigger-set alignment gap between `amg` and `none`? Regenerates one prompt set
with the benchmark's seeds (prompt i, seed 1000·s + i, s = 0..3), scores every image the way
`bench mitigate` does (cosine of its probe features to the centre of the set's planted images) and
bootstraps the paired difference of the means over prompts.
Usage: .venv/bin/python reports/v5/alignment_ci.py [SET]   (default image_dup)"""
import json
import sys

import numpy as np

import memfree
from memfree.bench.mitigate import _features, trigger_alignment
from memfree.mitigate import default_index, generate
from memfree.testbed.bundle import load_testbed

name = sys.argv[1] if len(sys.argv) > 1 else "image_dup"
model = memfree.load()
tb = load_testbed(model)
index = default_index(model)
entries = tb.eval_sets[name]
seeds = (0, 1, 2, 3)


def per_image(method: str) -> np.ndarray:
    """(seeds, prompts) cosine of each image to its planted group's mean features."""
    out = np.zeros((len(seeds), len(entries)))
    for a, s in enumerate(seeds):
        kwargs = {"train_index": index} if method != "none" else {}
        g = generate(model, [e["prompt"] for e in entries], method, seed=s * 1000, progress=False, **kwargs)
        out[a] = trigger_alignment(tb, name, entries, _features(tb, g.images))
    return out


base, amg = per_image("none"), per_image("amg")
diff = amg - base                                    # paired: same prompt, same seed
rng = np.random.default_rng(0)
boot = [diff[:, rng.integers(0, diff.shape[1], diff.shape[1])].mean() for _ in range(10000)]  # resample prompts
print(json.dumps({"set": name, "generations": int(diff.size), "none": round(float(base.mean()), 4),
                  "amg": round(float(amg.mean()), 4), "difference_points": round(100 * float(diff.mean()), 2),
                  "ci95_points": [round(100 * float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)],
                  "images_changed": int((np.abs(diff) > 1e-6).sum())}, indent=2))
