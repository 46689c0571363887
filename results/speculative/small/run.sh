#!/usr/bin/env bash
# #26 with the decoder's linear layers of a verification pass through the few-row kernel
# (knnlm.small_linear; knnlm/cpu.py: small_linears), on top of ../final's code: ../final/run.sh's
# sets and commands (every set the median of 3 rounds of plain model.generate, plain kNN-LM and
# kNN-LM + drafts back to back per prompt), the ablation KNNLM_SMALL_LINEAR=off instead of
# KNNLM_GROUPED_ATTENTION=off, and a third run of the two stdlib sets. Resumable.
HERE=$(cd "$(dirname "$0")" && pwd)
R=${R:-/work/runs/spec13} ABLATE=KNNLM_SMALL_LINEAR TAG=nosmall THIRD=1 exec bash "$HERE/../final/run.sh"
