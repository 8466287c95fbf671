"""Experiment: wen with the loss averaged over the first K steps of the guided trajectory, no early stop.

Usage: python reports/v3tok/wen_steps.py verbatim K:ITERS:LR ... (first 20 captions, seeds 0-19).
Prints one JSON line per setting: memorized share, mean first-step score, mean K-step score, seconds.
"""
import json, sys, time
import torch
import memfree
from memfree.sampling import _alpha_bar, _to_eps, _from_eps, initial_noise, sample
from memfree.testbed.bundle import load_testbed

model = memfree.load(); tb = load_testbed(model)
entries = tb.eval_sets[sys.argv[1]][:20]
prompts = [e["prompt"] for e in entries]
seeds = list(range(len(prompts)))
x_T = initial_noise(model, seeds)
for p in model.unet.parameters():
    p.requires_grad_(False)

def rollout(emb, K):
    sched = model.scheduler; sched.set_timesteps(model.num_inference_steps)
    x = x_T * sched.init_noise_sigma
    uncond = model.encode([""]).expand(len(x), -1, -1)
    out = []
    for t in sched.timesteps[:K]:
        x_in = sched.scale_model_input(x, t); a = _alpha_bar(model, t)
        with torch.no_grad():
            eps_u = _to_eps(model, model.unet(x_in, t, uncond).sample.float(), x_in, a)
        eps_c = _to_eps(model, model.unet(x_in, t, emb).sample.float(), x_in, a)
        out.append((eps_c - eps_u).flatten(1).norm(dim=1))
        eps = eps_u + model.guidance_scale * (eps_c.detach() - eps_u)
        x = sched.step(_from_eps(model, eps, x_in, a), t, x).prev_sample
    return torch.stack(out, 1)

for spec in sys.argv[2:]:
    K, iters, lr = int(spec.split(":")[0]), int(spec.split(":")[1]), float(spec.split(":")[2])
    t0 = time.time()
    orig = model.encode(prompts).float().detach()
    tail = orig[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.AdamW([tail], lr=lr)
    for it in range(iters):
        s = rollout(torch.cat([orig[:, :1], tail], 1), K)
        opt.zero_grad(); s.mean(1).sum().backward(); opt.step()
    emb = torch.cat([orig[:, :1], tail.detach()], 1)
    with torch.no_grad():
        s_after = rollout(emb, K)
    out = sample(model, prompts, seeds, latents=x_T, prompt_embeds=emb, progress=False)
    nn = tb.index.search(out.images)
    print(json.dumps({"K": K, "iters": iters, "lr": lr, "mem": float(nn.memorized.float().mean()),
                      "first": round(float(out.scores[:, 0].mean()), 3), "kmean": round(float(s_after.mean()), 3),
                      "s": round(time.time() - t0, 1)}), flush=True)
