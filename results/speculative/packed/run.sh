#!/usr/bin/env bash
# #26 after 4d3d094: drafting on the CPU multiplies the output layer with oneDNN and a prepacked
# weight (knnlm/cpu_head.py). The same sets and commands as ../match2/run.sh (the match-length
# drafter, SmolLM2-135M, the 1.1M-key stdlib datastore and the python3.11-doc one, batch 1, 64 new
# tokens, lambda adaptive, drafts <= 16), run against this tree; then the two stdlib sets again with
# KNNLM_PACKED_HEAD=off (the output layer as it is), for the difference the packed layer makes.
# The forward-pass cost by positions: benchmarks/bench_verify.py (verify.txt here).
REPO=${REPO:-$(git rev-parse --show-toplevel)}
export R=${R:-/work/runs/spec8}
mkdir -p $R
bash $REPO/results/speculative/match2/run.sh
cd $REPO; export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
source /tmp/venv0/bin/activate
L=/root/.pyenv/versions/3.11.7/lib/python3.11
off() { local name=$1; shift; [ -s $R/$name.done ] && return 0
  KNNLM_PACKED_HEAD=off python benchmarks/bench_generate.py --datastore /work/runs/stdlib-1m --draft-tokens 16 \
      --prompts 8 --prompt-tokens 64 --max-new-tokens 64 --lambda adaptive --json $R/$name.json "$@" \
      > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
off neardup_off --prompt-set heldout --prompt-files $L/encodings/cp874.py $L/encodings/kz1048.py --prompts-per-file 4
off datastore_off --prompt-set datastore
