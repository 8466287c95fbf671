r"""AMG in latent space on the latent testbed: x̂0 compared with the training images' VAE latents (a
:class:`memfree.similarity.LatentIndex`, nL2 over latents pooled to a grid) and steered away without a decode, alone
and composed with the copy detector's cosine index. Every image is judged by pixel nL2 (< 1.4) and by the copy
detector, as in amg_two_judges.py. It produced docs/results/latent/amg-latent.json:

    python experiments/amg_latent.py --model testbed-latent --out docs/results/latent/amg-latent.json
"""
import json
from pathlib import Path

from common import experiment_parser, judged_twice, open_testbed
from memfree.images import from_uint8
from memfree.io import write_json
from memfree.mitigate import build_mitigation, default_index, generate
from memfree.similarity import LatentIndex, write_index_tuning
from memfree_testbed.bundle import training_items

parser = experiment_parser(__doc__)
parser.add_argument("--sets", default="verbatim,caption_dup,heldout")
parser.add_argument("--limit", type=int, default=20)
parser.add_argument("--grid", type=int, default=8)
parser.add_argument("--guides", default="none,latent,latent+detector")
parser.add_argument("--latent-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an AMGConfig value for the latent piece (e.g. lam_lo=0.35)")
parser.add_argument("--latent-index", default="runs/latent/latent-index", help="where the latent index is (built if absent)")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
folder = Path(f"{args.latent_index}-g{args.grid}")
if not (folder / LatentIndex.FILE).exists():
    _, captions = training_items(tb.images, tb.manifest)
    LatentIndex.from_images(model.vae, from_uint8(tb.images), captions,
                            grid=args.grid).save(folder)
latent_opts = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.latent_opt)}
write_index_tuning(folder, amg={"amg": latent_opts})   # the latent index's own gate and scales
latent, cosine = LatentIndex.load(folder), default_index(model)


guides = {"none": lambda: "none",
          "detector": lambda: build_mitigation("amg", index=cosine),
          "latent": lambda: build_mitigation("amg", index=latent),
          "latent+detector": lambda: build_mitigation("amg", index=[latent, cosine])}
rows = []
for name in args.sets.split(","):
    prompts = [e["prompt"] for e in tb.eval_sets[name]][:args.limit]
    for guide in args.guides.split(","):
        g = generate(model, prompts, guides[guide](), seed=0, progress=False)
        rows.append({"prompt_set": name, "guided_by": guide, "prompts": len(prompts),
                     **judged_twice(tb, g.images),
                     "seconds_per_image": round(g.seconds / len(prompts), 3)})
        print(rows[-1], flush=True)
write_json(args.out, {"model": model.label, "grid": args.grid, "latent_options": latent_opts,
                      "note": "seconds are on a shared 2-core CPU, for comparison within a set", "rows": rows})
