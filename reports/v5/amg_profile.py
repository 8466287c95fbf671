"""Where `amg`'s time goes on ordinary prompts: one pass over the 50 held-out prompts under cProfile,
printing the calls under AMG.__call__ (similarity checks, the third UNet branch, caption encoding).
Usage: .venv/bin/python reports/v5/amg_profile.py
Measured 2026-12-01 on 2 CPU cores, nothing else running: the pass 20.5 s under the profiler, AMG
0.83 s, of which `nearest` (the checks) 0.47 s (FAISS 0.28 s) and 11 calls with the gate open
0.21 s of UNet and 0.07 s of caption encoding; 21.7 checks an image."""
import cProfile
import pstats

import memfree
from memfree.mitigate import default_index, generate
from memfree.testbed.bundle import load_testbed

model = memfree.load()
index = default_index(model)
prompts = [e["prompt"] for e in load_testbed(model).eval_sets["heldout"]]
generate(model, prompts[:2], "amg", progress=False, train_index=index)  # warm-up
profiler = cProfile.Profile()
profiler.enable()
g = generate(model, prompts, "amg", progress=False, train_index=index)
profiler.disable()
print("checks an image", sum(r.extra["amg"]["checked_steps"] for r in g.reports) / len(prompts))
print("seconds inside AMG", round(g.piece_seconds, 3), "of", round(g.seconds, 3))
stats = pstats.Stats(profiler)
stats.sort_stats("cumulative").print_callees("guidance.py.*__call__")
stats.print_stats("guidance|index.py|faiss", 12)
