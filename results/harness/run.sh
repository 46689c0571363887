#!/bin/bash
# #14 acceptance: the knnlm lm-eval model on the full stdlib test split vs knnlm eval (same documents)
set -euo pipefail
cd /work/main
export HF_HUB_OFFLINE=1
DS=${DS:-/work/runs/base-150k}
OUT=/work/runs/harness
mkdir -p $OUT
python examples/harness/make_jsonl.py $(python -m knnlm.corpora stdlib-test) --out runs/harness/stdlib_test.jsonl
date; /usr/bin/time -v knnlm eval --datastore $DS --data $(python -m knnlm.corpora stdlib-test) --lambda 0.25 --quiet --output $OUT/eval.json > $OUT/eval.log 2>&1
date; /usr/bin/time -v python -m knnlm.harness --model knnlm --model_args pretrained=smollm2,datastore=$DS,lambda=0.25 \
    --tasks stdlib_test --include_path examples/harness --batch_size 8 --device cpu --output_path $OUT/lambda0.25 > $OUT/h025.log 2>&1
date; /usr/bin/time -v python -m knnlm.harness --model knnlm --model_args pretrained=smollm2,lambda=0 \
    --tasks stdlib_test --include_path examples/harness --batch_size 8 --device cpu --output_path $OUT/lambda0 > $OUT/h0.log 2>&1
date; python examples/harness/compare.py --data runs/harness/stdlib_test.jsonl --knnlm $OUT/eval.json \
    --harness $OUT/lambda0.25 --harness-base $OUT/lambda0 | tee $OUT/compare.txt
