"""Replay the filtered v6 retraining (τ = 2.5) from scratch with a per-step trace, to see how it breaks.

The first attempt (`memfree testbed train --data runs/v6/data --out runs/v6/runf25 --filter-threshold
2.5`) went from a running loss of 0.033 at step 1,150 to 1.0 by step 1,400, and its network then
output the same near-zero image whatever its input. This runs the same recipe (seed, data, per-step
random streams) with a trace of every step: the filter's scores (‖ε_c − ε_u‖₂ per sample), the share
kept (and the share under 2.5), the size of the conditional prediction and of the text embedding,
and the gradient norm before clipping. TAU "off" keeps every sample (the unfiltered recipe) but
still records the scores; RUN resumes from its checkpoint when it has one. MIN_KEPT (a remedy on
trial, off by default) runs a step unfiltered when the filter would keep under that share of it.
Usage: .venv/bin/python reports/v6f25/replay.py DATA RUN STEPS [TAU [MIN_KEPT]] > reports/v6f25/replay.jsonl
(DATA as built by `memfree testbed data --out D --ordinary 5760 --repeats 20 --verbatim-captions
named`, with the bundled tokenizer copied to RUN/tokenizer_build; about 1.1 s a step on 2 CPU cores)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from memfree.mitigate import training_scores
from memfree.testbed.train import train

data, run, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
TAU = 2.5 if len(sys.argv) < 5 else math.inf if sys.argv[4] == "off" else float(sys.argv[4])
MIN_KEPT = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
state = Path(run) / "train_state.json"
trace: dict = {}
step = [json.loads(state.read_text())["step"] if state.exists() else 0]
clip = torch.nn.utils.clip_grad_norm_


def clip_and_record(params, max_norm, *args, **kwargs):
    norm = clip(params, max_norm, *args, **kwargs)
    trace["grad_norm"] = round(float(norm), 4)
    return norm


def traced_keep(unet, x_t, t, cond, uncond, eps_cond):
    if trace:  # the previous step's record, now that its gradient norm is known
        print(json.dumps(trace), flush=True)
    scores = training_scores(unet, x_t, t, cond, uncond, eps_cond)
    keep = scores < TAU
    if keep.float().mean() < MIN_KEPT:
        keep = torch.ones_like(keep)
    q = torch.quantile(scores, torch.tensor([0.5, 0.9, 1.0]))
    trace.clear()
    trace.update({"step": step[0], "kept": round(float(keep.float().mean()), 3),
                  "under_2.5": round(float((scores < 2.5).float().mean()), 3),
                  "score_p50": round(float(q[0]), 3), "score_p90": round(float(q[1]), 3),
                  "score_max": round(float(q[2]), 3), "eps_cond_std": round(float(eps_cond.std()), 4),
                  "cond_std": round(float(cond.std()), 4), "grad_norm": None})
    step[0] += 1
    return keep


torch.nn.utils.clip_grad_norm_ = clip_and_record
train(data, run, keep_mask_fn=traced_keep, stop_after=steps, log_every=10, quiet=True)
print(json.dumps(trace), flush=True)
