r"""memfree.protect on a plain diffusers pipeline against memfree's own `generate`, on a model memfree ships.

Each trigger set's prompts (seed s·1000 + i, the benchmark's first seed round) are generated twice with AMG:
by `memfree.mitigate.generate` and by `StableDiffusionPipeline.from_pretrained(model folder)` under
`memfree.protect(pipe, "amg")`, from the same x_T, with the model's scheduler and guidance. Per set: the share
each path leaves memorized (the testbed's copy detector and nL2), how many images AMG acted on, and the
largest pixel difference between the two paths. Both paths steer by every index the folder ships, behind the
default screens. It produced docs/results/latent/protect-parity.json:

    python experiments/protect_parity.py --model testbed-latent --out docs/results/latent/protect-parity.json
"""
import torch
from diffusers import StableDiffusionPipeline

from common import experiment_parser, open_testbed
from memfree.io import write_json
from memfree.mitigate import default_indexes, generate
from memfree.protect import protect
from memfree.sampling import initial_noise
from memfree.similarity import NL2_THRESHOLD

parser = experiment_parser(__doc__)
parser.add_argument("--sets", default="verbatim,image_dup,caption_dup,paraphrase,heldout")
parser.add_argument("--seed", type=int, default=0, help="seed round s: prompt i gets s·1000 + i (default: 0)")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
indexes = default_indexes(model)   # what `--mitigation amg` steers by, with the default screens
pipe = StableDiffusionPipeline.from_pretrained(model.path)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = model.new_scheduler()


def verdicts(images: torch.Tensor) -> dict:
    out = {"memorized_nl2": float((tb.index.search(images).nl2 < NL2_THRESHOLD).float().mean())}
    if tb.copy_index is not None:
        sim, _ = tb.copy_index.search(tb.copy_index.embedder(images), 1)
        out["memorized"] = float((sim[:, 0] > tb.copy_threshold).float().mean())
    return out


rows = {}
for name in args.sets.split(","):
    prompts = [e["prompt"] for e in tb.eval_sets[name]]
    seeds = [args.seed * 1000 + i for i in range(len(prompts))]
    ours = generate(model, prompts, "amg", seed=args.seed * 1000, progress=False)
    none = generate(model, prompts, "none", seed=args.seed * 1000, progress=False)
    with protect(pipe, "amg", index=indexes, threshold=model.settings.threshold):
        theirs = pipe(prompts, num_inference_steps=model.settings.num_inference_steps,
                      guidance_scale=model.settings.guidance_scale, latents=initial_noise(model, seeds),
                      output_type="pt")
    rows[name] = {"prompts": len(prompts), "none": verdicts(none.images), "generate_amg": verdicts(ours.images),
                  "protect_amg": verdicts(theirs.images.float()),
                  "acted_generate": int(sum(r.applied for r in ours.reports)),
                  "acted_protect": int(sum(r.mitigated for r in theirs.memorization)),
                  "max_abs_difference": float((theirs.images.float() - ours.images).abs().max())}
    print(name, rows[name], flush=True)
write_json(args.out, {"model": model.label, "seed_round": args.seed, "steps": model.settings.num_inference_steps,
                      "sets": rows})
