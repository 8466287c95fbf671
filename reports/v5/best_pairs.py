"""Upper bound for the top-two deletion target on the bundled model: for each caption that the
detection benchmark explained, delete every single word and every pair of words, score all of
them on the benchmark's own evaluation noise (seed 1000, 4 generations), and count the captions
that some deletion of at most two words brings under the threshold. The greedy explainer cannot
do better than this oracle, which sees the grading noise.
Usage: .venv/bin/python reports/v5/best_pairs.py > reports/v5/best-pairs.json   (about 2 minutes)
"""
import itertools
import json

import memfree
from memfree.bench.detect import score_prompts
from memfree.explain import without_words, word_spans

model = memfree.load()
bench = json.load(open("reports/v5/bench-detect.json"))["explain"]
threshold = bench["threshold"]
rows = []
for r in bench["rows"]:
    p = r["prompt"]
    n = len(word_spans(p))
    drops = [[i] for i in range(n)] + [list(c) for c in itertools.combinations(range(n), 2)]
    scores = score_prompts(model, [without_words(p, d) for d in drops], generations=bench["eval_generations"],
                           seed=bench["eval_seed"], progress=False).mean((1, 2)).tolist()
    best = min(range(len(drops)), key=scores.__getitem__)
    rows.append({"prompt": p, "score": r["score"], "greedy_top2": r["without_top2"],
                 "best_drop": [p[a:b] for a, b in (word_spans(p)[i] for i in drops[best])],
                 "best_score": scores[best], "flips": scores[best] < threshold})
print(json.dumps({"threshold": threshold, "prompts": len(rows),
                  "oracle_top2_flip_rate": sum(r["flips"] for r in rows) / len(rows),
                  "greedy_top2_flip_rate": bench["deletion_top2_flip_rate"], "rows": rows}, indent=1))
