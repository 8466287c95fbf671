"""image_dup memorization of the bundled model under the report's seeds (0-3 for every prompt) and the
benchmark's (1000*s + i for prompt i). Usage: .venv/bin/python reports/v5/image_dup_seeds.py
Measured 2026-12-01: 0.90 and 0.55, 80 generations each."""
import memfree, torch
from memfree.sampling import sample
from memfree.testbed.bundle import load_testbed
model = memfree.load(); tb = load_testbed(model)
prompts = [e["prompt"] for e in tb.eval_sets["image_dup"]]
for name, seedf in (("report seeds 0-3", lambda s, i: s), ("bench seeds 1000s+i", lambda s, i: 1000 * s + i)):
    mem = []
    for s in range(4):
        out = sample(model, prompts, [seedf(s, i) for i in range(len(prompts))], progress=False)
        mem.append(tb.index.search(out.images).memorized.float())
    m = torch.cat(mem); print(name, float(m.mean()), len(m))
