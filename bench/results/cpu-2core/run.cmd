# Exact commands of the committed CPU measurement (repository root, venv active; `sgex-export` and
# `sgex-bench` are the installed console scripts of `python -m export.cli` / `python -m bench.cli`).
# The graphs are exported first (not timed), then both benchmarks read them with --artifacts; the
# accuracy column proves the exported weights are the benchmarked ones.
python -m export.cli --task superres --res 128 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m export.cli --task toonify --res 128 --random-weights --seed 0 --out /tmp/sgex-bench-art
python -m bench.cli --task superres --res 128 --backends torch-official,torch,ort --batch 1 --mode image --warmup 1 --iters 5 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/superres-128-image.json --plot bench/results/cpu-2core/superres-128-image.png
python -m bench.cli --task toonify --res 128 --backends torch-official,torch,ort --batch 1 --mode video --frames 8 --warmup 1 --iters 2 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-128-video.json --plot bench/results/cpu-2core/toonify-128-video.png
# Video end to end (decode + model + encode, OpenCV and PyAV, serial vs pipelined, same clip, same run);
# needs the `video` extra; reads the toonify export above. Result not committed yet.
python -m bench.cli --task toonify --res 128 --backends torch,ort --batch 1 --mode video --frames 16 --warmup 1 --iters 3 --random-weights --seed 0 --artifacts /tmp/sgex-bench-art --json bench/results/cpu-2core/toonify-128-video-e2e.json
