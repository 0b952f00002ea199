# Exact commands of the committed CPU measurement (repository root, venv active; `sgex-export` and
# `sgex-bench` are the installed console scripts of `python -m export.cli` / `python -m bench.cli`).
# The graphs are exported first (not timed), then both benchmarks read them with --artifacts; the
# accuracy column proves the exported weights are the benchmarked ones.
# --res is the bucket's OUTPUT side: bucket 512 holds x1 up to 128x128, and each run is timed at
# x1 128x128 -> output 512x512 (the shapes of the earlier `--res 128` runs, when --res named x1).
python -m export.cli --task superres --res 512 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m export.cli --task toonify --res 512 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m bench.cli --task superres --res 512 --backends torch-official,torch,ort --batch 1 --mode image --warmup 1 --iters 5 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/superres-512-image.json --plot bench/results/cpu-2core/superres-512-image.png
python -m bench.cli --task toonify --res 512 --backends torch-official,torch,ort --batch 1 --mode video --frames 8 --warmup 1 --iters 2 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-512-video.json --plot bench/results/cpu-2core/toonify-512-video.png
# Video end to end (decode + model + encode, OpenCV and PyAV, serial vs pipelined, same clip, same run);
# needs the `video` extra; reads the toonify export above. Result not committed yet.
python -m bench.cli --task toonify --res 512 --backends torch,ort --batch 1 --mode video --frames 16 --warmup 1 --iters 3 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-512-video-e2e.json
# sgex-serve load test (bench/serve_load.py) on the superres export above: 32 requests from 4
# concurrent clients through a local Ray Serve replica (2 CPUs, ORT 2 intra-op threads), and the
# same 32 requests through one in-process Engine in the same run.
python -m bench.serve_load --artifacts /tmp/sgex-bench-art/superres --requests 32 --concurrency 4 --warmup 4 --max-batch 4 --batch-wait-ms 20 --num-cpus 2 --seed 0 --json bench/results/cpu-2core/serve-superres-512.json
