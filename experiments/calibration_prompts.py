"""Calibration prompts for `memfree calibrate`: ordinary training captions of a testbed data set that are in
no evaluation set, distinct, drawn with a fixed seed, one a line on stdout.

It made docs/results/v6/calibration_prompts.txt (the bundled model ships the same file as
testbed/calibration_prompts.txt) and the v4/v5 ones before it:

    python experiments/calibration_prompts.py --data runs/v6/data > docs/results/v6/calibration_prompts.txt

DATA is a folder written by `memfree testbed data`; a testbed model's own `testbed/` folder holds the same
manifest and images, so it serves as well.
"""
import argparse

import numpy as np

from memfree_testbed.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", required=True, metavar="DIR", help="testbed data folder (manifest.json, images.npz)")
parser.add_argument("--count", type=int, default=300, help="number of prompts (default: 300)")
parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
args = parser.parse_args()

_, manifest = load_dataset(args.data)
in_eval = {e["prompt"] for entries in manifest["eval"].values() for e in entries}
ordinary = sorted({t["caption"] for t in manifest["train"] if t["kind"] == "ordinary"} - in_eval)
pick = np.random.default_rng(args.seed).choice(len(ordinary), size=args.count, replace=False)
print("\n".join(ordinary[i] for i in sorted(pick)))
