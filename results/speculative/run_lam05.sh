#!/usr/bin/env bash
# the same at lambda 0.5 (a kNN-LM that leans more on the datastore), near-duplicate prompts
cd /work/snap26; export PYTHONPATH=/work/snap26 HF_HUB_OFFLINE=1
source /tmp/venv0/bin/activate
R=/work/runs/bench26; L=/root/.pyenv/versions/3.11.7/lib/python3.11
python benchmarks/bench_generate.py --datastore /work/runs/stdlib-1m --draft-tokens 8 --prompts 8 --prompt-tokens 64 \
  --max-new-tokens 64 --lambda 0.5 --json $R/neardup_lam05.json --prompt-set heldout \
  --prompt-files $L/encodings/cp874.py $L/encodings/kz1048.py --prompts-per-file 4 > $R/neardup_lam05.txt 2> $R/neardup_lam05.err
