"""AMG sweep on the bundled testbed: memorization per set, seed 0, one generation per prompt."""
import json, sys, time
import memfree
from memfree.mitigate import generate
from memfree.testbed.bundle import load_testbed
from memfree.testbed.probe import accuracy

model = memfree.load()
tb = load_testbed(model)
sets = {"verbatim": 20, "image_dup": 20, "paraphrase": 20, "heldout": 50}
for name, method, amg in json.loads(sys.argv[1]):
    row = {"name": name}
    for s, n in sets.items():
        entries = tb.eval_sets[s][:n]
        t0 = time.perf_counter()
        g = generate(model, [e["prompt"] for e in entries], method, seed=0, index=tb.index, amg=amg, progress=False)
        cell = {"mem": sum(r.memorized for r in g.reports) / n, "fired": sum(r.applied for r in g.reports) / n,
                "nl2": round(sum(r.nl2 for r in g.reports) / n, 3), "s": round(time.perf_counter() - t0, 1)}
        if s == "heldout":
            cell["align"] = round(accuracy(tb.probe.predict(g.images), [e["attrs"] for e in entries])["mean"], 3)
        row[s] = cell
    print(json.dumps(row), flush=True)
