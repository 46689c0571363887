#!/usr/bin/env bash
# #32 acceptance, part 2: the stdlib 1.1M datastore's index split in 2 shards with its own training
# (reindex --keep-training), neighbours of 12,000 held-out queries vs the unsharded index, eval with
# --shard-search over 2 ranks vs one process over the unsharded index, and bench_ranks (1 vs 2 ranks).
REPO=${REPO:-$(git rev-parse --show-toplevel)}
set -x; export PYTHONPATH=$REPO
cd $REPO
source /tmp/venv0/bin/activate
export HF_HUB_OFFLINE=1
DS=/work/runs/stdlib-1m; S2=/work/runs/stdlib-1m-s2; R=/work/runs/acc32
TEST=$(python -m knnlm.corpora stdlib-test)
step() { local name=$1; shift; [ -s $R/$name.done ] && return 0; /usr/bin/time -v "$@" > $R/$name.txt 2> $R/$name.err && date > $R/$name.done; }
while [ ! -s $R/eval_2ranks.done ]; do sleep 20; done
step reindex_s2 python -m knnlm reindex $S2 --index-shards 2 --keep-training --index-storage disk
step shard_check python -m experiments.shard_check --unsharded $DS --sharded $S2 --data $TEST --queries 12000 --out $R/shard_check.json
step eval_shard_search torchrun --standalone --nproc-per-node 2 -m knnlm eval --datastore $S2 --data $TEST --lambda adaptive,0.25 --shard-search --output $R/eval_shard_search.json --quiet
step bench_ranks python benchmarks/bench_ranks.py --datastore $S2 --nproc 2 --queries 4096 --k 1024 --data $TEST --max-tokens 16000 --json $R/bench_ranks.json
