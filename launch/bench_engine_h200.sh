#!/usr/bin/env bash
# Issue 14's three engine runs on one GPU (docs/benchmarks.md, `$B`): the Azure offline batch,
# batch-64 and batch-1 decode, each writing OUTDIR/<run>.json and OUTDIR/<run>.log.
# Usage: [EXTRA="--config.engine.attention_impl=pallas"] [TAG=_pallas] [OFFLINE="--host_profile=25"] [JCC=dir]
#        bash launch/bench_engine_h200.sh OUTDIR [offline] [b64] [b1]
# (EXTRA: more flags for every run; TAG: a suffix of the output files' names; OFFLINE: the offline
# run's extra flags, by default a profiled rerun; JCC: JAX's compilation cache, by default /tmp/jcc.)
set -o pipefail
out=$1; shift
B="python3 launch/bench_throughput.py --config=configs/llama3_8b.py --config.model.max_seq_len=4096 \
  --config.engine.max_batch=128 --config.engine.num_pages=20000 --config.engine.token_budget=2048 \
  --config.engine.max_chunk=512 --config.engine.compile_cache_dir=${JCC:-/tmp/jcc} $EXTRA"
B1="python3 launch/bench_throughput.py --config=configs/llama3_8b.py --config.model.max_seq_len=1024 \
  --config.engine.max_batch=1 --config.engine.num_pages=2000 --config.engine.token_budget=512 \
  --config.engine.max_chunk=512 --config.engine.compile_cache_dir=${JCC:-/tmp/jcc}1 $EXTRA"
for run in "$@"; do
  t0=$(date +%s)
  case $run in
    offline) $B --num_requests=200 ${OFFLINE---profile_dir=/tmp/p200} --output=$out/offline$TAG.json ;;
    b64) $B --num_requests=64 --input_len=512 --output_len=256 --output=$out/b64$TAG.json ;;
    b1) $B1 --num_requests=1 --input_len=512 --output_len=256 --output=$out/b1$TAG.json ;;
  esac 2>&1 | grep -v "^W\|^I0\|Compiling\|cuda_executor" | tee $out/$run$TAG.log | tail -12
  echo "== $run took $(( $(date +%s) - t0 )) s"
done
