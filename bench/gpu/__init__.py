"""The GPU proof: `bash bench/gpu/run.sh OUTDIR` (and its CPU smoke) with its helpers."""
