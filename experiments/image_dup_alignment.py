r"""Is the image-duplicate alignment gap a cost of AMG or of the measure? Each image-duplicate generation of the
benchmark (its prompts and seeds) under `none`, `amg` and `amg-strong`: its pixel nL2 to the nearest training image
and its trigger alignment (the probe's cosine to the planted picture's features, the benchmark's measure), then
alignment by nL2 band over all methods. If the generations just over the copy threshold score as low as AMG's, no
generation that is not a copy can be within 2 points of `none`. It produced
docs/results/latent/image-dup-alignment.json:

    OMP_NUM_THREADS=1 python experiments/image_dup_alignment.py --model testbed-latent \
        --out docs/results/latent/image-dup-alignment.json
"""
import numpy as np
import torch

from common import experiment_parser, open_testbed
from memfree.io import write_json
from memfree.mitigate import generate
from memfree_bench.mitigate import trigger_alignment

METHODS = ("none", "amg", "amg-strong")
BANDS = (0.0, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 9.0)
parser = experiment_parser(__doc__)
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
entries = tb.eval_sets["image_dup"]
per_image = []
for method in METHODS:
    for s in range(args.seeds):   # the benchmark's seeds: prompt i gets s·1000 + i
        images = generate(model, [e["prompt"] for e in entries], method, seed=s * 1000, progress=False).images
        with torch.no_grad():
            feats = tb.probe.features(images)
        nl2 = tb.index.search(images).nl2
        for e, n, a in zip(entries, nl2.tolist(), trigger_alignment(tb, "image_dup", entries, feats)):
            per_image.append({"method": method, "seed": s, "image": e["image"], "nl2": n, "alignment": a})
    mine = [r for r in per_image if r["method"] == method]
    print(method, "alignment", round(float(np.mean([r["alignment"] for r in mine])), 4), flush=True)
none_alignment = float(np.mean([r["alignment"] for r in per_image if r["method"] == "none"]))
bands = []
for lo, hi in zip(BANDS, BANDS[1:]):
    inside = [r for r in per_image if lo <= r["nl2"] < hi]
    if inside:
        mean = float(np.mean([r["alignment"] for r in inside]))
        bands.append({"nl2_from": lo, "nl2_to": hi, "generations": len(inside), "alignment": mean,
                      "points_vs_none": 100 * (mean - none_alignment),
                      "methods": {m: sum(r["method"] == m for r in inside) for m in METHODS}})
        print(bands[-1], flush=True)
write_json(args.out, {"model": model.label, "none_alignment": none_alignment, "bands": bands,
                      "per_image": per_image})
