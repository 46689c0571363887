#!/usr/bin/env bash
# #32 acceptance: data-parallel eval over 2 torchrun ranks equals one process (stdlib 1.1M datastore)
REPO=${REPO:-$(git rev-parse --show-toplevel)}
set -x; export PYTHONPATH=$REPO
cd $REPO
source /tmp/venv0/bin/activate
export HF_HUB_OFFLINE=1
DS=/work/runs/stdlib-1m; R=/work/runs/acc32
TEST=$(python -m knnlm.corpora stdlib-test)
step() { local name=$1; shift; [ -s $R/$name.done ] && return 0; /usr/bin/time -v "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
step eval_1proc python -m knnlm eval --datastore $DS --data $TEST --lambda adaptive,0.25 --output $R/eval_1proc.json --quiet
step eval_2ranks torchrun --standalone --nproc-per-node 2 -m knnlm eval --datastore $DS --data $TEST --lambda adaptive,0.25 --output $R/eval_2ranks.json --quiet
