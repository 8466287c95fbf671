"""What every experiment starts with: a command line with --model, and the model with its testbed ground truth."""
from __future__ import annotations

import argparse

import memfree
from memfree_testbed import Testbed, load_testbed


def experiment_parser(doc: str, bootstrap: int | None = None) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with --model (default: the bundled testbed) and,
    for scripts that give intervals, --bootstrap with that many resamples by default."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="model folder or name (default: testbed, the bundled one)")
    if bootstrap is not None:
        parser.add_argument("--bootstrap", type=int, default=bootstrap,
                            help=f"bootstrap resamples over prompts (default: {bootstrap})")
    return parser


def open_testbed(model: str) -> tuple[memfree.Model, Testbed]:
    m = memfree.load(model)
    return m, load_testbed(m)
