#!/usr/bin/env bash
# #27 acceptance on stdlib (1.1M-key datastore): self-tuned gate (no tuning split) vs fixed lambda 0.25,
# the retrieval gate at F 0.5, a gate from the tuning split for comparison, the keep-unseen gate.
set -x; export PYTHONPATH=/work/snap27
cd /work/snap27
source /tmp/venv0/bin/activate
export HF_HUB_OFFLINE=1
DS=/work/runs/stdlib-1m; R=/work/runs/stdlib27
TEST=$(python -m knnlm.corpora stdlib-test)
step() { local name=$1; shift; [ -s $R/$name.done ] && return 0; /usr/bin/time -v "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
step selftune python -m knnlm tune --datastore $DS --quiet
step eval_default python -m knnlm eval --datastore $DS --data $TEST --lambda adaptive,0.25 --output $R/eval_default.json --quiet
step eval_f05 python -m knnlm eval --datastore $DS --data $TEST --lambda adaptive --retrieve-fraction 0.5 --output $R/eval_f05.json --quiet
step tune_split python -m knnlm tune --datastore $DS --data $(python -m knnlm.corpora stdlib-tune) --max-tokens 100000 --out $R/gate_split.json --quiet
step eval_split python -m knnlm eval --datastore $DS --data $TEST --lambda adaptive --gate $R/gate_split.json --output $R/eval_split.json --quiet
step tune_keep python -m knnlm tune --datastore $DS --keep-unseen --out $R/gate_keep.json --quiet
step eval_keep python -m knnlm eval --datastore $DS --data $TEST --lambda adaptive --gate $R/gate_keep.json --output $R/eval_keep.json --quiet
