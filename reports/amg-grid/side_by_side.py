"""Side by side, 8 prompts per set (verbatim, image_dup, paraphrase), seed 0: rows are none, amg with
grid=0 (the old preset), amg with grid=1 (the new preset) and the training image nearest to the last.
Writes side-by-side.png here."""
import torch, numpy as np
from PIL import Image
import memfree
from memfree.mitigate import generate
from memfree.testbed.bundle import load_testbed
m = memfree.load(); tb = load_testbed(m)
rows = []
for s in ("verbatim", "image_dup", "paraphrase"):
    ps = [e["prompt"] for e in tb.eval_sets[s][:8]]
    for amg in (None, {"grid": 0}, {}):
        g = generate(m, ps, "none" if amg is None else "amg", seed=0, amg=amg, progress=False)
        rows.append(torch.cat(list(g.images), dim=2))
    nn = tb.index.search(g.images)
    rows.append(torch.cat([torch.from_numpy(tb.images[int(i)]).permute(2, 0, 1).float() / 255 for i in nn.ids], dim=2))
img = torch.cat(rows, dim=1)
arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save("reports/amg-grid/side-by-side.png")
