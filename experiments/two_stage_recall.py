r"""Two-stage search on the latent testbed (docs/index-at-scale.md): a cheap first embedder finds candidates, the
copy detector ranks them. How often the two-stage top-1 equals the copy detector's exact top-1, and whether the
copy verdict changes, per number of candidates and per first embedder; queries are generations of verbatim and
held-out captions and copy-style edits of training images. It produced docs/results/latent/two-stage.json:

    python experiments/two_stage_recall.py --model testbed-latent --out docs/results/latent/two-stage.json
"""
from pathlib import Path

import torch
from PIL import Image

from common import experiment_parser, open_testbed
from memfree.images import from_uint8
from memfree.index import PixelEmbedder, TrainingIndex
from memfree.index_scale import build_scaled
from memfree.io import write_json
from memfree.mitigate import default_index, generate

parser = experiment_parser(__doc__)
parser.add_argument("--work", default="runs/latent/two-stage", help="scratch folder: images and indexes")
parser.add_argument("--firsts", default="pixel:4,pixel:8,pixel:16")
parser.add_argument("--candidates", default="1,10,50,100,500")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
copy_index = default_index(model)
detector, threshold = copy_index.embedder, tb.copy_threshold
work = Path(args.work)
images_dir = work / "images"
if not (images_dir / "done").exists():
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(tb.images):
        Image.fromarray(a).save(images_dir / f"{i:05d}.png")
    (images_dir / "done").write_text("")

train = from_uint8(tb.images)
g = torch.Generator().manual_seed(0)
pick = torch.randperm(len(train), generator=g)[:100]
edited = train[pick]
edited = torch.nn.functional.interpolate(edited[:, :, 4:60, 4:60], size=64, mode="bilinear", align_corners=False)
jitter = 0.8 + 0.4 * torch.rand(len(edited), 3, 1, 1, generator=g)
edited = (edited * jitter + 0.03 * torch.randn(edited.shape, generator=g)).clamp(0, 1)
queries = {"edited training images": edited}
for name in ("verbatim", "heldout"):
    prompts = [e["prompt"] for e in tb.eval_sets[name]][:20]
    queries[f"{name} generations"] = generate(model, prompts, "none", seed=0, progress=False).images

with torch.no_grad():
    exact = {q: copy_index.search(detector(x), 1) for q, x in queries.items()}   # the detector over every image
rows = []
for spec in args.firsts.split(","):
    size = int(spec.split(":")[1])
    folder = work / f"index-{size}"
    idx = build_scaled(str(images_dir), folder, PixelEmbedder(size), shard_size=2000, final_embedder=detector) \
        if not (folder / "meta.json").exists() else TrainingIndex.load(folder)
    for c in (int(v) for v in args.candidates.split(",")):
        idx.candidates = c
        for q, x in queries.items():
            with torch.no_grad():
                sim, pos = idx.search(idx.embedder(x), 1)
            found = torch.tensor([int(str(idx.ids[int(p)]).split(".")[0]) for p in pos[:, 0]])
            want_sim, want = exact[q]
            want_ids = torch.tensor([int(copy_index.ids[int(p)]) for p in want[:, 0]])
            rows.append({"first": spec, "candidates": c, "queries": q, "n": len(x),
                         "same_top1": float((found == want_ids).float().mean()),
                         "same_verdict": float(((sim[:, 0] > threshold) == (want_sim[:, 0] > threshold))
                                               .float().mean()),
                         "copies_exact": float((want_sim[:, 0] > threshold).float().mean()),
                         "copies_two_stage": float((sim[:, 0] > threshold).float().mean())})
            print(rows[-1], flush=True)
write_json(args.out, {"model": model.label, "training_images": len(train), "copy_threshold": threshold, "rows": rows})
