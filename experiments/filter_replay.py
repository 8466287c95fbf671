r"""Replay the testbed's training recipe under the training-time filter with a trace of every step, to see how a
filtered retraining breaks (the v6 retraining at τ = 2.5 collapses at step 1,200; docs/results.md).

This is `memfree testbed train`'s loop written out (same seed, data, per-step random streams, model
initialisation, AdamW, learning-rate schedule, caption dropout, gradient clipping and filtered loss; no EMA,
no checkpoints), so that every step can be traced: the filter's scores ‖ε_c − ε_u‖₂ per sample (median,
90th percentile, max), the share kept and the share under 2.5, the size of the conditional prediction and of
the text embedding, the gradient norm before clipping (None when the filter kept nothing and the step was
skipped) and the step's loss. One JSON line per step on stdout. ``--tau off`` keeps every sample (the
unfiltered recipe) but still records the scores; ``--min-kept`` (a remedy on trial, off by default) runs a
step unfiltered when the filter would keep less than that share of its batch.

It starts from scratch, or with ``--resume RUN`` from the checkpoint of a `memfree testbed train` run
folder (which it reads and never writes); the step-1,000 state of the τ = 2.5 run is made by
`memfree testbed train --data D --out RUN --filter-threshold 2.5 --stop-after 1000`, with the bundled
model's tokenizer copied to RUN/tokenizer_build first. The tokenizer is the run's ``tokenizer_build`` when
there is one, else the bundled model's. D is the v6 data,
`memfree testbed data --out D --ordinary 5760 --repeats 20 --verbatim-captions named`; about 1.1 s a step
on 2 CPU cores.

Its predecessor (reports/v6f25/replay.py, which traced `train()` itself) produced docs/results/v6f25/:

    python experiments/filter_replay.py --data D --steps 1400 > docs/results/v6f25/replay.jsonl
    python experiments/filter_replay.py --data D --resume RUN --steps 400 --tau off \
        > docs/results/v6f25/control-unfiltered.jsonl
    python experiments/filter_replay.py --data D --resume RUN --steps 400 --min-kept 0.5 \
        > docs/results/v6f25/guard-0.5.jsonl

Checked on a few steps only (not rerun in full): from scratch, its steps 0 to 2 print the same figures as
replay.jsonl's first three lines and the same losses as `train()`'s log; resumed from a `train()` checkpoint at
step 2, its step 2 equals the one run from scratch.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from memfree.images import from_uint8_signed
from memfree.mitigate import training_scores
from memfree_testbed import model_dir
from memfree_testbed.data import load_dataset
from memfree_testbed.train import draw_batch, make_text_encoder, make_unet, train_scheduler

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", required=True, metavar="DIR", help="testbed data folder (memfree testbed data)")
parser.add_argument("--steps", type=int, required=True, help="steps to run in this call")
parser.add_argument("--tau", default="2.5", help="filter threshold, or 'off' to keep every sample (default: 2.5)")
parser.add_argument("--min-kept", type=float, default=0.0,
                    help="run a step unfiltered when the filter would keep less than this share (default: 0, never)")
parser.add_argument("--resume", default=None, metavar="RUN",
                    help="start from the checkpoint of this `memfree testbed train` run folder (read only)")
parser.add_argument("--total-steps", type=int, default=10000,
                    help="length of the recipe's learning-rate schedule (default: 10000, as `memfree testbed train`)")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--token-init-std", type=float, default=1.0)
parser.add_argument("--device", default="cpu", help="cpu or cuda; the random streams stay on the CPU")
args = parser.parse_args()
tau = math.inf if args.tau == "off" else float(args.tau)
device = args.device
state = None
if args.resume:   # the run must have been trained with the recipe these flags describe
    state = json.loads((Path(args.resume) / "train_state.json").read_text())
    for key, flag in (("steps", "total_steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                      ("token_init_std", "token_init_std")):
        if key in state and state[key] != getattr(args, flag):
            option = "--" + flag.replace("_", "-")
            parser.error(f"{args.resume} was trained with {key}={state[key]}; pass {option} {state[key]}")

# The data and the captions' token ids, as `train()` prepares them.
images, manifest = load_dataset(args.data)
pixels = from_uint8_signed(images)
items = manifest["train"]
image_ids = torch.tensor([t["image"] for t in items])
run_tokenizer = Path(args.resume, "tokenizer_build") if args.resume else None
tokenizer = CLIPTokenizer.from_pretrained(run_tokenizer if run_tokenizer and run_tokenizer.exists()
                                          else model_dir() / "tokenizer")
ids_all = tokenizer([t["caption"] for t in items], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]

# The models, optimiser and schedule, in `train()`'s order (the seed fixes the initial weights).
torch.manual_seed(args.seed)
unet, text_encoder = make_unet(manifest["size"]), make_text_encoder(args.token_init_std)
unet = unet.to(device, memory_format=torch.channels_last)
text_encoder = text_encoder.to(device)
scheduler = train_scheduler()
params = list(unet.parameters()) + list(text_encoder.parameters())
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
total = args.total_steps
warmup = min(200, total // 10)
lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1))
                                                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
start = 0
if state is not None:
    tensors = load_file(str(Path(args.resume) / "checkpoint.safetensors"))
    unet.load_state_dict({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[len("text."):]: v for k, v in tensors.items() if k.startswith("text.")})
    opt.load_state_dict(torch.load(Path(args.resume) / "optimizer.pt", weights_only=True, map_location=device))
    lr_schedule.load_state_dict(state["lr_scheduler"])
    start = state["step"]

unet.train(), text_encoder.train()
for step in range(start, start + args.steps):
    x_t, noise, t, ids, _, _ = draw_batch(step, args.seed, pixels, image_ids, ids_all, empty_ids, args.batch_size,
                                    0.1, scheduler, device)   # train()'s batch, caption dropout 0.1
    cond = text_encoder(ids).last_hidden_state
    pred = unet(x_t, t, cond).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    with torch.no_grad():
        uncond = text_encoder(empty_ids[None].expand(args.batch_size, -1).to(device)).last_hidden_state
        scores = training_scores(unet, x_t, t, cond.detach(), uncond, eps_cond=pred.detach())
    keep = scores < tau
    if keep.float().mean() < args.min_kept:
        keep = torch.ones_like(keep)
    keep = keep.float()
    loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    grad_norm = None
    if keep.sum() > 0:   # a batch with no survivor skips the optimiser step
        loss.backward()
        grad_norm = round(float(torch.nn.utils.clip_grad_norm_(params, 1.0)), 4)
        opt.step()
    lr_schedule.step()
    q = torch.quantile(scores.cpu(), torch.tensor([0.5, 0.9, 1.0]))
    print(json.dumps({"step": step, "kept": round(float(keep.mean()), 3),
                      "under_2.5": round(float((scores < 2.5).float().mean()), 3),
                      "score_p50": round(float(q[0]), 3), "score_p90": round(float(q[1]), 3),
                      "score_max": round(float(q[2]), 3), "eps_cond_std": round(float(pred.detach().std()), 4),
                      "cond_std": round(float(cond.detach().std()), 4), "grad_norm": grad_norm,
                      "loss": round(loss.item(), 5)}), flush=True)
