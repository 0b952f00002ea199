# Exact commands of the committed CPU measurements (repository root, venv active; `sgex-export`,
# `sgex-calib` and `sgex-bench` are the console scripts of these modules). --res is the bucket's
# OUTPUT side: bucket 512 holds x1 up to 128x128; each run is timed at x1 128x128 -> 512x512.
# Run 2026-12-01 on the 2-core Intel Xeon (AVX-512 BF16), one command at a time:
python -m export.cli --task superres --res 512 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m export.cli --task toonify --res 512 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m calib.cli --bf16 --artifacts /tmp/sgex-bench-art/superres --samples 2 --seed 0 --report bench/results/cpu-2core/superres-512-bf16-gate.md
python -m calib.cli --bf16 --artifacts /tmp/sgex-bench-art/toonify --samples 2 --seed 0 --report bench/results/cpu-2core/toonify-512-bf16-gate.md
python -m bench.cli --task superres --res 512 --backends torch-official,torch,ort,openvino-fp32,openvino-bf16 --batch 1 --mode image --warmup 1 --iters 5 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/superres-512-image.json --plot bench/results/cpu-2core/superres-512-image.png
# The toonify video run (23:18 UTC) and the gates above (23:10, gate format 2: the style -> synth
# pipeline gated too) are this stop's second session; the image run above used the first gate
# format, whose superres configuration (no FP32 islands) the re-run gate confirmed.
python -m bench.cli --task toonify --res 512 --backends torch-official,torch,ort,openvino-fp32,openvino-bf16 --batch 1 --mode video --frames 8 --warmup 1 --iters 2 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-512-video.json --plot bench/results/cpu-2core/toonify-512-video.png
python -m bench.serve_load --artifacts /tmp/sgex-bench-art/superres --requests 32 --concurrency 4 --warmup 4 --max-batch 4 --batch-wait-ms 20 --num-cpus 2 --seed 0 --json bench/results/cpu-2core/serve-superres-512.json
# Earlier run (2026-11-21, AMD EPYC, --res then named x1): toonify-128-video.*, made by
# python -m runtime.bench --task toonify --res 128 --backends torch-official,torch,ort --batch 1 --mode video --frames 8 --warmup 1 --iters 2 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-128-video.json --plot bench/results/cpu-2core/toonify-128-video.png
