#!/bin/sh
# Ship a testbed model as the bundled one, then measure it in full into OUT (about 2 h on 2 CPU
# cores; `bench mitigate` resumes from its JSON and the shipping step is skipped once done, so an
# interrupted run can be started again).
# Usage: sh reports/v4/bundle.sh [MODEL] [CALIBRATION_PROMPTS] [OUT]   (from the repository root;
# MODEL must be calibrated already, as reports/v4/assess.sh does)
set -e
M=${1:-runs/v4/run/model}
P=${2:-reports/v4/calibration_prompts.txt}
R=${3:-reports/v4}
B=memfree/testbed/model
MF=.venv/bin/memfree
mkdir -p $R
if ! cmp -s $M/unet/diffusion_pytorch_model.safetensors $B/unet/diffusion_pytorch_model.safetensors; then
    rm -rf $B.new && cp -r $M $B.new
    cp $P $B.new/testbed/calibration_prompts.txt
    $MF index build --images $B.new/testbed --embedder pixel --out $B.new/testbed/index --quiet
    rm -rf $B && mv $B.new $B
fi
$MF bench detect --json $R/bench-detect.json --plot $R/bench-detect-roc.png --quiet
$MF bench mitigate --json $R/bench-mitigate.json --plot $R/bench-mitigate.png --table $R/bench-mitigate.md --quiet
$MF bench mitigate --methods none,amg-no-spe,amg-no-dup,amg-no-sim,amg-always,amg-const,amg-every,amg-screen \
    --json $R/bench-mitigate.json --plot $R/bench-mitigate.png --table $R/bench-mitigate.md --quiet
$MF bench overhead --methods amg,amg-screen,wen --set heldout --repeats 3 --json $R/bench-overhead-heldout.json --quiet
