"""Prompts in: from files (text, CSV, JSONL) and checked against the tokenizer's length."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Sequence


def warn_truncated(model, prompts: Sequence[str]) -> list[bool]:
    """Flag (and warn about) prompts the tokenizer cuts to its maximum length."""
    limit = model.tokenizer.model_max_length
    flags = [len(ids) > limit for ids in model.tokenizer(list(prompts), truncation=False).input_ids]
    if any(flags):
        warnings.warn(f"{sum(flags)} prompt(s) exceed {limit} tokens and were truncated", stacklevel=3)
    return flags


def read_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a text file (one a line), a CSV (``,`` or ``;``) or JSONL file with a named column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        col = column or "prompt"
        if rows and col not in rows[0]:
            raise ValueError(f"{path} has no field {col!r} (fields: {', '.join(rows[0])})")
        prompts = [str(r[col]) for r in rows]
    elif path.suffix.lower() in (".csv", ".tsv"):
        delimiter = ";" if text.split("\n", 1)[0].count(";") > text.split("\n", 1)[0].count(",") else ","
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else delimiter)
        col = column or next((c for c in ("prompt", "Caption", "caption", "text") if c in (reader.fieldnames or [])), None)
        if col is None or col not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column or 'prompt'!r} (columns: {', '.join(reader.fieldnames or [])})")
        prompts = [r[col] for r in reader]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
