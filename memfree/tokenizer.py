"""Build the CLIP BPE tokenizer offline from the vocabulary file that ships inside pip packages.

Stable Diffusion's tokenizer is CLIP's byte-level BPE with 49,408 tokens. The merges list is
distributed as ``bpe_simple_vocab_16e6.txt.gz`` inside the clip-anytorch (and open-clip-torch)
wheels; from it we derive the ``vocab.json`` / ``merges.txt`` pair that transformers'
``CLIPTokenizer`` reads, so no hub download is needed.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from memfree.io import write_text

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48894 - 1 + 1  # lines 1..48894 after the header line (line 0)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_characters() -> list[str]:
    """The 256 characters byte-level BPE uses for bytes, in CLIP's vocabulary order.

    Printable bytes map to themselves and come first; the remaining bytes map to code points from
    256 upward and follow, in byte order. The vocabulary ids of CLIP depend on this order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def find_bpe_file() -> Path:
    """Locate the BPE vocabulary inside an installed package without importing it (clip imports torchvision)."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / BPE_FILENAME
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        f"{BPE_FILENAME} not found: install it with `pip install --no-deps clip-anytorch==2.6.0` "
        "or pass a tokenizer directory that already holds vocab.json and merges.txt"
    )


def write_clip_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write vocab.json and merges.txt for CLIPTokenizer into ``out_dir`` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path or find_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    tokens = byte_characters()
    tokens = tokens + [c + "</w>" for c in tokens] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 tokens, built {len(vocab)}: is {BPE_FILENAME} the CLIP one?")
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(out_dir / "merges.txt", 
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def build_clip_tokenizer(out_dir: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Build and save a CLIPTokenizer equivalent to Stable Diffusion's in ``out_dir``."""
    write_clip_tokenizer_files(out_dir)
    tok = CLIPTokenizer.from_pretrained(
        str(out_dir),
        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=max_length,
    )
    tok.save_pretrained(out_dir)
    return tok
