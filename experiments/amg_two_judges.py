r"""AMG guided by one similarity and judged by another, on the latent testbed: the copy detector's cosine index (the
shipped one), a pixel index (nL2 on 32×32 thumbnails, built here), and both pieces composed in one sampling loop.

Each guide runs on the first ``--limit`` prompts of each set at seed round 0 (prompt i: seed i); every image is
judged by pixel nL2 (< 1.4) and by the copy detector (cosine above its threshold). It produced
docs/results/latent/amg-two-judges.json:

    python experiments/amg_two_judges.py --model testbed-latent --out docs/results/latent/amg-two-judges.json
"""
from pathlib import Path

from common import experiment_parser, judged_twice, open_testbed
from memfree.index import PixelEmbedder, TrainingIndex, build_index
from memfree.io import write_json
from memfree.mitigate import build_mitigation, default_index, generate
from memfree_testbed.bundle import training_items

parser = experiment_parser(__doc__)
parser.add_argument("--sets", default="verbatim,caption_dup,heldout")
parser.add_argument("--limit", type=int, default=20)
parser.add_argument("--pixel-index", default="runs/latent/pixel-index", help="where the pixel index is (built if absent)")
parser.add_argument("--pixel-size", type=int, default=32, help="thumbnail side of the pixel index (default: 32)")
parser.add_argument("--pixel-factory", default="flat", help="FAISS index type of the pixel index (flat or sq8)")
parser.add_argument("--guides", default="none,copy detector,pixels,both")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
cosine = default_index(model)
if not (Path(args.pixel_index) / "meta.json").exists():
    _, captions = training_items(tb.images, tb.manifest)
    build_index(tb.images, args.pixel_index, PixelEmbedder(size=args.pixel_size), factory=args.pixel_factory,
                captions=captions, progress=False)
pixel = TrainingIndex.load(args.pixel_index)


guides = {"none": lambda: "none", "copy detector": lambda: build_mitigation("amg", index=cosine),
          "pixels": lambda: build_mitigation("amg", index=pixel),
          "both": lambda: build_mitigation("amg", index=[pixel, cosine])}   # one AMG piece per index, one loop
rows = []
for name in args.sets.split(","):
    prompts = [e["prompt"] for e in tb.eval_sets[name]][:args.limit]
    for guide in args.guides.split(","):
        make = guides[guide]
        g = generate(model, prompts, make(), seed=0, progress=False)
        rows.append({"prompt_set": name, "guided_by": guide, "prompts": len(prompts),
                     **judged_twice(tb, g.images),
                     "seconds_per_image": round(g.seconds / len(prompts), 3)})
        print(rows[-1], flush=True)
write_json(args.out, {"model": model.label, "pixel_index": {"size": args.pixel_size, "factory": args.pixel_factory},
                      "note": "seconds are on a shared 2-core CPU, for comparison within a set",
                      "rows": rows})
