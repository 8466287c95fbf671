r"""Could a bar on the latent screen's σ narrow the spot check? At the spot step, for every image of every benchmark
set generated at seeds 5000 + i and 6000 + i (not the benchmark's): its latent σ, whether it was under watch
already, and whether the spot check's full check fired (per index). A bar would be safe only if every image the
spot check catches stood above most ordinary ones. It produced docs/results/latent/spot-latent.json:

    OMP_NUM_THREADS=1 python experiments/spot_latent.py --model testbed-latent \
        --out docs/results/latent/spot-latent.json
"""
import torch

import memfree.guidance as guidance
from common import experiment_parser, open_testbed
from memfree.denoise import predict_x0
from memfree.io import write_json
from memfree.mitigate import generate

SETS = ("heldout", "verbatim", "paraphrase", "image_dup", "caption_dup")
parser = experiment_parser(__doc__)
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

records, current = [], {}
call = guidance.AMG.__call__


def spot_recorder(self, s):
    cfg, log = self.config, self.log
    total = s.model.scheduler.config.num_train_timesteps
    spot = (cfg.spot_check and self.latent_screen is not None and float(s.t) <= cfg.spot_check * total
            and any(not log[i]["spotted"] for i in s.indices))
    before = {i: (log[i]["watch"], len(log[i]["steps"])) for i in s.indices} if spot else {}
    call(self, s)
    if spot:
        with torch.no_grad():
            latent = self.latent_screen.similarity(predict_x0(s.x_t, s.eps.detach(), s.alpha_bar))
        for j, i in enumerate(s.indices):
            fired = any(step["step"] == s.step for step in log[i]["steps"][before[i][1]:])
            records.append({**current, "image": int(i), "index": self.index.path.name,
                            "latent_sigma": float(latent[j]), "under_watch_before": before[i][0], "fired": fired})


guidance.AMG.__call__ = spot_recorder
model, tb = open_testbed(args.model)
summary = {}
for name in SETS:
    for seed in (5000, 6000):
        current = {"set": name, "seed": seed}
        generate(model, [e["prompt"] for e in tb.eval_sets[name]], "amg", seed=seed, progress=False)
    mine = [r for r in records if r["set"] == name]
    values = torch.tensor([r["latent_sigma"] for r in mine])
    caught = [r["latent_sigma"] for r in mine if r["fired"] and not r["under_watch_before"]]
    summary[name] = {"checks": len(mine),
                     "latent_sigma_quartiles": values.quantile(torch.tensor([.25, .5, .75])).tolist(),
                     "caught_by_the_spot_check": len(caught), "lowest_latent_sigma_caught": min(caught, default=None)}
    print(name, summary[name], flush=True)
write_json(args.out, {"model": model.label, "summary": summary, "records": records})
