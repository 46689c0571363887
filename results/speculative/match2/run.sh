#!/usr/bin/env bash
# #26, the match-length drafter of results/speculative/match/ after the mixture got cheaper on the CPU
# (642496d: the dense kNN log-probabilities take the log only at the voted tokens; same values) and
# GGUF loads were cached (62beb83): the same sets, then the two stdlib sets again (run-to-run spread),
# and the datastore documents with bfloat16 weights (drafting is not token-identical there).
# Earlier: #26 with the match-length drafter (the longest exact match of the sequence's end, in the
# datastore's neighbours or in the sequence itself; drafts as long as the match) and greedy
# verification that stops scoring at the first rejected token: speculative kNN-LM greedy vs plain
# kNN-LM vs plain model.generate, batch 1, 64 new tokens, SmolLM2-135M, the 1.1M-key stdlib
# datastore (IVF4096,PQ64, nprobe 32, k 1024), the datastore's default lambda (adaptive).
REPO=${REPO:-$(git rev-parse --show-toplevel)}
set -x
cd $REPO; export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
source /tmp/venv0/bin/activate
R=${R:-/work/runs/spec7}; N=${N:-16}
L=/root/.pyenv/versions/3.11.7/lib/python3.11

run() { local name=$1; shift; [ -s $R/$name.done ] && return 0
  python benchmarks/bench_generate.py --datastore /work/runs/stdlib-1m --draft-tokens $N --prompts 8 --prompt-tokens 64 \
      --max-new-tokens 64 --lambda adaptive --json $R/$name.json "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
run neardup --prompt-set heldout --prompt-files $L/encodings/cp874.py $L/encodings/kz1048.py --prompts-per-file 4
run datastore --prompt-set datastore
run prose --prompt-set prose --prose /work/runs/prose.txt
run heldout --prompt-set heldout

# a second corpus: the Python 3.11 docs reST sources (Debian python3.11-doc), the 100k-token datastore of #27
# (/work/runs/pydoc/ds, IVF256,SQfp16); prompts from its documents and from its held-out files
P=/work/runs/pydoc
runp() { local name=$1; shift; [ -s $R/$name.done ] && return 0
  python benchmarks/bench_generate.py --datastore $P/ds --draft-tokens $N --prompts 8 --prompt-tokens 64 \
      --max-new-tokens 64 --lambda adaptive --json $R/$name.json "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
runp pydoc_datastore --prompt-set datastore
runp pydoc_heldout --prompt-set heldout --prompt-files $(cat $P/test.txt)


# the two stdlib sets again, after everything above
run neardup_r2 --prompt-set heldout --prompt-files $L/encodings/cp874.py $L/encodings/kz1048.py --prompts-per-file 4
run datastore_r2 --prompt-set datastore
# bfloat16 weights: a forward pass over 17 tokens costs about one over 1 here (AMX), but the
# multi-token pass rounds differently from the one-token pass, and greedy output drifts
run datastore_bf16 --prompt-set datastore --dtype bfloat16
