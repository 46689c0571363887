#!/usr/bin/env bash
# #27: gate quality vs self-tuning sample size (5k / 20k / 100k tokens of the datastore's own documents),
# on the two non-stdlib corpora; defaults (adaptive) vs fixed lambda 0.25 on the held-out 20k tokens,
# and the retrieval gate at F 0.5 with the default 20k gate.
set -x
cd /work/snap27; export PYTHONPATH=/work/snap27 HF_HUB_OFFLINE=1
source /tmp/venv0/bin/activate
R=/work/runs/study
step() { local name=$1; shift; [ -s $R/$name.done ] && return 0; "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
for n in 20000 5000; do
  for c in pydoc handbook; do
    D=/work/runs/$c
    step tune_${c}_$n python -m knnlm tune --datastore $D/ds --max-tokens $n --out $R/gate_${c}_$n.json --quiet
    step eval_${c}_$n python -m knnlm eval --datastore $D/ds --data $(cat $D/test.txt) --max-tokens 20000 --gate $R/gate_${c}_$n.json --lambda adaptive,0.25 --output $R/eval_${c}_$n.json --quiet
    if [ $n = 20000 ]; then
      step f05_${c} python -m knnlm eval --datastore $D/ds --data $(cat $D/test.txt) --max-tokens 20000 --gate $R/gate_${c}_$n.json --lambda adaptive --retrieve-fraction 0.5 --output $R/f05_${c}.json --quiet
    fi
  done
done
