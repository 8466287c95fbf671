#!/bin/sh
# Rebuild the models that reports/v5/gpu_train.py sent back, then attach ground truth and probe on the CPU.
# Usage: sh reports/v5/unpack.sh PIECES_DIR DATA NAME...   -> runs/v5/NAME/model
set -e
P=$1; D=$2; shift 2
mkdir -p runs/v5
for N in "$@"; do
    cat $P/$N.tar.part* | tar -x -C runs/v5
    # Every run's tokenizer is the same CLIP build; the bundled model's copy is the one export writes.
    cp -r memfree/testbed/model/tokenizer runs/v5/$N/model/tokenizer
    .venv/bin/python -c "import sys; from memfree.testbed.train import finish_model; print(finish_model(sys.argv[1], sys.argv[2], quiet=True))" runs/v5/$N/model $D
done
