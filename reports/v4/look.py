"""Top row: v4 generations for the first 10 verbatim captions (seed i for caption i); bottom row: the planted photo.
Usage: python reports/v4/look.py MODEL DATA OUT.png   (prints each generation's nL2 and whether its nearest image is its own photo)
"""
import sys
import numpy as np
from PIL import Image
import memfree
from memfree.sampling import sample, to_uint8
from memfree.similarity import PixelIndex
from memfree.testbed.data import load_dataset
model = memfree.load(sys.argv[1])
images, m = load_dataset(sys.argv[2])
index = PixelIndex(images)
ev = m["eval"]["verbatim"][:10]
out = sample(model, [e["prompt"] for e in ev], list(range(10)), progress=False)
nn = index.search(out.images)
print("nl2", [round(float(v), 2) for v in nn.nl2], "nearest is own", [int(i) == e["image"] for i, e in zip(nn.ids, ev)])
rows = [np.concatenate([gi, images[e["image"]]], 0) for gi, e in zip(to_uint8(out.images), ev)]
Image.fromarray(np.concatenate(rows, 1)).resize((320 * 2, 64 * 2), Image.NEAREST).save(sys.argv[3])
