#!/usr/bin/env bash
# #26 after da8fdf0 (a cheaper kNN-LM step on the CPU: numpy's row argmax, a per-row lambda mixed
# only at the voted tokens, the unseen mask kept) on top of 4d3d094 (the packed output layer):
# the same sets and commands as ../packed/run.sh (which runs ../match2/run.sh, then the two stdlib
# sets with KNNLM_PACKED_HEAD=off), against this tree.
REPO=${REPO:-$(git rev-parse --show-toplevel)}
export R=${R:-/work/runs/spec9}
bash $REPO/results/speculative/packed/run.sh
