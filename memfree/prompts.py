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


def _jsonl_prompts(path: Path, text: str, column: str) -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise ValueError(f"{path}, line {n}: expected an object with the field {column!r}")
        if not isinstance(row[column], str):
            raise ValueError(f"{path}, line {n}: {column!r} must be a string, got {type(row[column]).__name__}")
        prompts.append(row[column])
    return prompts


def read_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a text file (one a line), a CSV (``,`` or ``;``) or JSONL file with a named column.
    Every problem is reported with the file (and line) at fault."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"prompt file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _jsonl_prompts(path, text, column or "prompt")
    elif suffix in (".csv", ".tsv"):
        delimiter = ";" if text.split("\n", 1)[0].count(";") > text.split("\n", 1)[0].count(",") else ","
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else delimiter)
        col = column or next((c for c in ("prompt", "Caption", "caption", "text") if c in (reader.fieldnames or [])), None)
        if col is None or col not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column or 'prompt'!r} (columns: {', '.join(reader.fieldnames or [])})")
        prompts = [r[col] or "" for r in reader]
    else:
        if column is not None:
            raise ValueError(f"--column names a column of a CSV or JSONL file; {path} is plain text, one prompt a line")
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
