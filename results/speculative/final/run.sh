#!/usr/bin/env bash
# #26, the final code: the match-length drafter, greedy verification scored position by position, the
# cheaper kNN-LM step, the packed output layer from 4 rows and grouped-query attention without copied
# K / V heads (knnlm/cpu.py). Every set is measured as the median of 3 rounds of the three modes
# (plain model.generate, plain kNN-LM, kNN-LM + drafts) back to back per prompt (bench_generate.py
# --repeats 3), so a slow spell of this shared machine hits all three modes of a round.
# SmolLM2-135M, float32, greedy, batch 1, 64-token prompts, 64 new tokens, lambda adaptive, k 1024,
# drafts <= 16; the 1.1M-key stdlib datastore (IVF4096,PQ64, nprobe 32) and the 100k-key
# python3.11-doc one (IVF256,SQfp16). Then the two stdlib sets again, and with
# KNNLM_GROUPED_ATTENTION=off (the difference grouped attention makes), and bench_verify.py.
# Resumable: a set with a .done file is skipped. ../small/run.sh runs it with another ablation
# (ABLATE=KNNLM_SMALL_LINEAR TAG=nosmall) and a third run of the two stdlib sets (THIRD=1).
REPO=${REPO:-$(git rev-parse --show-toplevel)}
set -x
cd $REPO; export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
source /tmp/venv0/bin/activate
R=${R:-/work/runs/spec12}; N=${N:-16}; ABLATE=${ABLATE:-KNNLM_GROUPED_ATTENTION}; TAG=${TAG:-nogqa}
mkdir -p $R
python -c "from knnlm import ops; assert ops.load_extension()"  # build the csrc ops before timing
L=/root/.pyenv/versions/3.11.7/lib/python3.11
P=/work/runs/pydoc
run() { local name=$1 ds=$2; shift 2; [ -s $R/$name.done ] && return 0
  python benchmarks/bench_generate.py --datastore $ds --draft-tokens $N --prompts 8 --prompt-tokens 64 \
      --max-new-tokens 64 --lambda adaptive --repeats 3 --json $R/$name.json "$@" > $R/$name.txt 2> $R/$name.err \
      && date > $R/$name.done; }
S=/work/runs/stdlib-1m
NEARDUP="--prompt-set heldout --prompt-files $L/encodings/cp874.py $L/encodings/kz1048.py --prompts-per-file 4"
run datastore $S --prompt-set datastore
run neardup $S $NEARDUP
run prose $S --prompt-set prose --prose /work/runs/prose.txt
run heldout $S --prompt-set heldout
run pydoc_datastore $P/ds --prompt-set datastore
run pydoc_heldout $P/ds --prompt-set heldout --prompt-files $(cat $P/test.txt)
run datastore_r2 $S --prompt-set datastore
run neardup_r2 $S $NEARDUP
export "$ABLATE=off"  # the ablation: these two runs without it
run datastore_$TAG $S --prompt-set datastore
run neardup_$TAG $S $NEARDUP
unset "$ABLATE"
[ -s $R/verify.done ] || { python benchmarks/bench_verify.py --json $R/verify.json > $R/verify.txt 2> $R/verify.err \
  && date > $R/verify.done; }
if [ -n "${THIRD:-}" ]; then  # a third run of the two stdlib sets (pooled with the first two: pool.py --dir)
  run datastore_r3 $S --prompt-set datastore
  run neardup_r3 $S $NEARDUP
fi
