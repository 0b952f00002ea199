"""A bounded loopback load test of sgex-serve, with the same requests through one in-process Engine.

    python -m bench.serve_load --artifacts artifacts/superres --requests 64 --concurrency 4 \\
        --json bench/results/cpu-2core/serve-superres.json

One run, one machine, loopback only (127.0.0.1):
  1. `--requests` deterministic requests (seeded random images of one size from the export's
     buckets, one seed each) are run one by one through one in-process `runtime.Engine` with the
     replica's intra-op threads: its requests/s and per-request latency are the baseline, and its
     outputs (PNG-encoded) are what every served response must equal, byte for byte.
  2. sgex-serve starts on a local Ray (one replica unless --replicas), gets `--warmup` requests
     (not timed), then `--concurrency` clients send the same requests, a fixed number, each client
     one request at a time: requests/s (wall time of the timed phase), p50/p90/p99 latency per
     request, errors, mismatches, the replica's engine calls (so the mean batch) and style-cache
     counters from /healthz.
  3. Ray stops. The JSON (format "sgex-serve-load") holds every raw latency, the machine, the
     versions and the command. Exit 1 when any request failed or any response differed.

The ratio serve/engine requests/s is the cost (or the gain, with batching) of serving. Both
phases share the machine with the load generator's threads; say so beside any number.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import hashlib
import http.client
import json
import logging
import os
import platform
import shlex
import socket
import sys
import time

import numpy as np

from runtime._cli import run_main, setup_logging
from runtime.errors import SgexError

log = logging.getLogger("serve-load")

FORMAT = "sgex-serve-load"
VERSION = 1
PROG = "serve_load"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, metavar="DIR", help="exported task directory (sgex-export)")
    p.add_argument("--requests", type=int, default=64, metavar="N", help="timed requests (default 64)")
    p.add_argument("--concurrency", type=int, default=4, metavar="C", help="concurrent clients (default 4)")
    p.add_argument("--warmup", type=int, default=4, metavar="W", help="untimed requests first (default 4)")
    p.add_argument("--size", metavar="HxW",
                   help="input size (default: the largest square, multiple of 8, the smallest bucket holds)")
    p.add_argument("--distinct", type=int, metavar="K",
                   help="distinct images among the requests (default: every request its own); fewer "
                        "repeat images, and so their style codes (the style cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and the requests' seeds (default 0)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="sgex-serve replicas (default 1)")
    p.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 1), metavar="C",
                   help="CPUs per replica, also the Engine baseline's intra-op threads (default: all)")
    p.add_argument("--max-batch", type=int, default=4, metavar="B", help="sgex-serve --max-batch (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="T",
                   help="sgex-serve --batch-wait-ms (default 10)")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout (default 600 s)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _size(arg: str | None, engine) -> tuple[int, int]:
    if arg:
        try:
            h, w = (int(v) for v in arg.lower().split("x"))
        except ValueError:
            raise SgexError(f"--size {arg!r}: expected HxW, e.g. 64x64") from None
        if h < 1 or w < 1:
            raise SgexError(f"--size {arg!r}: sides must be >= 1")
        return h, w
    smallest = min(engine.buckets, key=lambda b: b.side)
    side = max(s for s in range(8, smallest.side + 1, 8) if smallest.holds(s, s))
    return side, side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes, seed: int, task: str, timeout: float) -> tuple[int, bytes, dict, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/{task}?seed={seed}", body=body, headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        data = r.read()
        return r.status, data, {k.lower(): v for k, v in r.getheaders()}, (time.perf_counter() - t0) * 1e3
    finally:
        conn.close()


def _health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _requests(n: int, distinct: int, hw: tuple[int, int], seed: int, spec) -> list[tuple[bytes, int]]:
    """(PNG bytes of the input, request seed) x n, deterministic."""
    from runtime import io as rio

    rng = np.random.default_rng(seed)
    shape = hw + ((3,) if spec.input_kind == "rgb" else ())
    top = 19 if spec.input_kind == "mask" else 256
    images = [rio.encode_image(rng.integers(0, top, shape, dtype=np.uint8), ".png") for _ in range(distinct)]
    return [(images[i % distinct], int(rng.integers(0, 2**31))) for i in range(n)]


def run_load(args) -> dict:
    from bench.cli import _cpu_model, _version, summarize
    from runtime import io as rio
    from runtime import serve as rs
    from runtime.engine import Engine

    for name, lo in (("requests", 1), ("concurrency", 1), ("warmup", 0), ("replicas", 1)):
        if getattr(args, name) < lo:
            raise SgexError(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    config = rs.ServeConfig(artifacts=args.artifacts, backend="ort", device="cpu", replicas=args.replicas,
                            num_cpus=args.num_cpus, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                            max_ongoing=max(4 * args.max_batch, args.concurrency),
                            max_queued=args.requests + args.warmup + args.concurrency).check()
    threads = config.intra_op_threads()
    engine = Engine(args.artifacts, backend="ort", device="cpu", intra_op_threads=threads)
    hw = _size(args.size, engine)
    distinct = args.distinct or args.requests
    if not 1 <= distinct <= args.requests:
        raise SgexError(f"--distinct must be 1..--requests, got {distinct}")
    reqs = _requests(args.requests, distinct, hw, args.seed, engine.spec)
    warm = _requests(args.warmup, max(1, args.warmup), hw, args.seed + 1, engine.spec) if args.warmup else []
    scale = engine.spec.variant(engine.variant).scales[0] if engine.spec.name == "superres" else None

    # 1. the in-process Engine: baseline and the expected bytes of every response
    log.info("engine: %d requests of %dx%d, one at a time, %d intra-op thread(s)", len(reqs), *hw, threads)
    for body, seed in warm[:1]:
        engine.process(rio.decode_image(body), seed=seed)
    expected, engine_ms = [], []
    t_engine = time.perf_counter()
    for body, seed in reqs:
        img = rio.decode_image(body)
        x = rio.resize_for_scale(img, scale) if scale else img
        t0 = time.perf_counter()
        y = engine.process(x, seed=seed)
        engine_ms.append((time.perf_counter() - t0) * 1e3)
        expected.append(hashlib.sha256(rio.encode_image(y, ".png")).hexdigest())
    t_engine = time.perf_counter() - t_engine
    engine_desc = engine.describe()
    engine.close()

    # 2. the same requests through sgex-serve on loopback
    port = args.port or _free_port()
    t_start = time.perf_counter()
    rs.start(config, host="127.0.0.1", port=port)
    start_s = time.perf_counter() - t_start
    try:
        for body, seed in warm:
            _post(port, body, seed, engine.task, args.timeout)
        before = _health(port)
        results = [None] * len(reqs)

        def client(i: int):
            body, seed = reqs[i]
            try:
                status, data, headers, ms = _post(port, body, seed, engine.task, args.timeout)
            except OSError as e:
                return i, (None, f"{type(e).__name__}: {e}", {}, None)
            return i, (status, data, headers, ms)

        log.info("serve: %d requests, %d concurrent clients", len(reqs), args.concurrency)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            for i, r in pool.map(client, range(len(reqs))):
                results[i] = r
        wall = time.perf_counter() - t0
        after = _health(port)
    finally:
        rs.stop()

    serve_ms, statuses, errors, mismatches, batch_sizes = [], {}, [], 0, []
    for i, (status, data, headers, ms) in enumerate(results):
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status != 200:
            errors.append({"request": i, "status": status,
                           "body": data[:200].decode(errors="replace") if isinstance(data, bytes) else data})
            continue
        serve_ms.append(ms)
        batch_sizes.append(int(headers.get("x-sgex-batch-size", 0)))
        if hashlib.sha256(data).hexdigest() != expected[i]:
            mismatches += 1
    delta = {k: after[k] - before[k] for k in ("requests", "engine_calls", "style_calls", "style_hits",
                                              "style_misses", "errors_4xx", "errors_5xx")}
    serve_rps = len(serve_ms) / wall if wall > 0 else None
    engine_rps = len(reqs) / t_engine
    return {
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench.serve_load", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": _cpu_model(),
                    "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "versions": {m: _version(m) for m in ("onnxruntime", "ray", "numpy", "cv2")},
        "task": engine.task, "variant": engine.variant, "input_size": list(hw), "requests": len(reqs),
        "distinct_images": distinct, "concurrency": args.concurrency, "warmup": len(warm),
        "config": {**config.__dict__, "intra_op_threads": threads},
        "engine": {"describe": engine_desc, "requests_per_s": engine_rps, "wall_s": t_engine,
                   "latency": summarize(engine_ms), "latency_ms_raw": engine_ms},
        "serve": {"start_s": start_s, "requests_per_s": serve_rps, "wall_s": wall,
                  "latency": summarize(serve_ms) if serve_ms else None, "latency_ms_raw": serve_ms,
                  "status_counts": statuses, "errors": len(errors), "error_samples": errors[:5],
                  "checked": len(serve_ms), "mismatches": mismatches, "replica_counters": delta,
                  "mean_batch": (delta["requests"] / delta["engine_calls"]) if delta["engine_calls"] else None,
                  "batch_size_histogram": {str(b): batch_sizes.count(b) for b in sorted(set(batch_sizes))}},
        "serve_over_engine_rps": (serve_rps / engine_rps) if serve_rps else None,
    }


def format_summary(r: dict) -> str:
    e, s = r["engine"], r["serve"]
    lines = [f"{r['task']} {r['input_size'][0]}x{r['input_size'][1]}, {r['requests']} requests, "
             f"{r['concurrency']} clients, max batch {r['config']['max_batch']}, "
             f"{r['config']['intra_op_threads']} intra-op thread(s)",
             f"  engine (in-process, one at a time): {e['requests_per_s']:.2f} req/s, "
             f"p50 {e['latency']['p50_ms']:.1f} ms, p99 {e['latency']['p99_ms']:.1f} ms"]
    if s["latency"]:
        lines.append(f"  sgex-serve (HTTP, loopback):        {s['requests_per_s']:.2f} req/s, "
                     f"p50 {s['latency']['p50_ms']:.1f} ms, p99 {s['latency']['p99_ms']:.1f} ms, "
                     f"mean batch {s['mean_batch'] or 0:.2f}")
        lines.append(f"  serve / engine: {r['serve_over_engine_rps']:.2f}x requests/s")
    lines.append(f"  errors {s['errors']}, responses checked {s['checked']}, mismatches {s['mismatches']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: _run(args))


def _run(args) -> int:
    from bench.cli import write_json

    result = run_load(args)
    print(format_summary(result))
    if args.json:
        write_json(args.json, result)
        log.info("wrote %s", args.json)
    return 0 if result["serve"]["errors"] == 0 and result["serve"]["mismatches"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
