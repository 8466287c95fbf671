"""Cost of one AMG similarity check on the bundled index: FAISS search, exact re-ranking, and the
whole `nearest` call, for a batch of 50 images. Usage: .venv/bin/python reports/v5/check_cost.py
Measured 2026-12-01 on 2 CPU cores: nearest 20 ms, full search 29 ms, FAISS alone 8 ms."""
import time

import numpy as np
import torch

import memfree
from memfree.guidance import nearest
from memfree.index import TrainingIndex
idx = TrainingIndex.load(memfree.bundled_model_path() / "testbed" / "index")
B=50
imgs = torch.rand(B,3,32,32)
emb = idx.embedder(imgs)
def t(f, n=5):
    f(); t0=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t0)/n*1e3
q=np.ascontiguousarray(emb.numpy(),dtype=np.float32)
print("faiss search ms", t(lambda: idx.index.search(q, 50)))
d,i=idx.index.search(q,50)
print("reconstruct ms", t(lambda: idx.vectors(torch.from_numpy(i).long())))
print("full search ms", t(lambda: idx.search(emb, 50)))
print("nearest ms", t(lambda: nearest(idx, imgs)))
print("threads", torch.get_num_threads())
