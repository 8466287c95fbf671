"""300 ordinary training captions of a testbed data set, none of them in an evaluation set.

Usage: python reports/v4/calibration_prompts.py DATA_DIR > PROMPTS.txt  (the calibration set for
`memfree calibrate`; the prompts are distinct and drawn with a fixed seed).
"""
import json
import sys
from pathlib import Path

import numpy as np

manifest = json.loads((Path(sys.argv[1]) / "manifest.json").read_text())
in_eval = {e["prompt"] for entries in manifest["eval"].values() for e in entries}
ordinary = sorted({t["caption"] for t in manifest["train"] if t["kind"] == "ordinary"} - in_eval)
pick = np.random.default_rng(0).choice(len(ordinary), size=300, replace=False)
print("\n".join(ordinary[i] for i in sorted(pick)))
