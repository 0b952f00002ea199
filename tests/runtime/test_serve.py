"""sgex-serve on loopback: a real `sgex-serve` process (local Ray, CPU, the tiny superres export),
real HTTP requests to 127.0.0.1, every answer checked against `runtime.Engine` on the same input.

Ray starts once for the module (about 5 to 20 s on the shared 2-core machine). Every loop is
bounded in count, and every wait in time."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120
MAX_BATCH = 2
MAX_ONGOING = 4
MAX_QUEUED = 8
MAX_BODY = 1_000_000
MAX_PIXELS = 1_000_000
SMALL_X1 = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process on the machine, from /proc."""
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(d))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cmdlines_with(text: str) -> list[str]:
    hits = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                hits.append(f"{d}: {cmd[:200]}")
    return hits


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(tiny_superres_export):
    """(Client, the server's Popen, its Ray temp dir) for a running sgex-serve; stopped at the end."""
    port = _free_port()
    raydir = tempfile.mkdtemp(prefix="sgray", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=raydir, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "runtime.serve", "--artifacts", str(tiny_superres_export), "--port", str(port),
           "--num-cpus", "1", "--max-batch", str(MAX_BATCH), "--batch-wait-ms", "500",
           "--max-ongoing", str(MAX_ONGOING), "--max-queued", str(MAX_QUEUED), "--retry-after", "2",
           "--max-body-bytes", str(MAX_BODY), "--max-pixels", str(MAX_PIXELS)]
    log = open(Path(raydir) / "sgex-serve.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            log.seek(0)
            text = log.read()
            if "sgex-serve: ready" in text:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sgex-serve did not start (rc {proc.poll()}):\n{text[-4000:]}")
            time.sleep(0.5)
        yield Client(port), proc, raydir
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(raydir, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(tiny_superres_export):
    from runtime.engine import Engine

    # One intra-op thread, as the replica (--num-cpus 1).
    return Engine(tiny_superres_export, backend="ort", intra_op_threads=1)


def _sizes(engine, n: int) -> list[tuple[int, int]]:
    """n distinct (height, width) that the export's buckets hold, multiples of 8 (no padding) and
    not: taken from the bucket table, not hard-coded."""
    # small x1 keep the requests cheap (the tiny export's bucket 1024 holds up to 256)
    top = min(SMALL_X1, max(b.max_input for b in engine.buckets))
    cands = [(h, w) for h in range(top, 7, -1) for w in (h, h - 4) if w > 7 and
             any(b.holds(h, w) for b in engine.buckets)]
    out = []
    for hw in cands:
        if hw not in out:
            out.append(hw)
        if len(out) == n:
            return out
    pytest.skip(f"the export's buckets hold fewer than {n} sizes")


def _png(img: np.ndarray) -> bytes:
    from runtime import io as rio

    return rio.encode_image(img, ".png")


def _image(seed: int, hw) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def _check_image_response(engine, status, headers, body, img, seed, x2=None):
    from runtime import io as rio

    assert status == 200, body[:300]
    want = engine.process(img, seed=seed, x2=x2)
    assert body == _png(want), "the response is not byte for byte Engine's output encoded as PNG"
    np.testing.assert_array_equal(rio.decode_image(body), want)
    assert headers["x-sgex-backend"] == "ort"
    assert int(headers["x-sgex-bucket"]) in [b.side for b in engine.buckets]


def _post(client, img, seed, **headers):
    return client.request("POST", f"/v1/superres?seed={seed}", _png(img), headers)


def test_models_and_health(server, engine):
    client, _, _ = server
    status, _, body = client.request("GET", "/v1/models")
    assert status == 200
    (m,) = json.loads(body)["models"]
    assert m["task"] == "superres" and m["variant"] == engine.variant
    assert m["buckets"] == [{"side": b.side, "max_batch": b.max_batch} for b in engine.buckets]
    assert m["random_weights"] is True and m["precision"] == engine.manifest.precision
    assert m["versions"] == engine.manifest.versions
    status, _, body = client.request("GET", "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["intra_op_threads"] == 1, "the replica's ORT pool must follow --num-cpus 1"


def test_engine_sessions_get_the_requested_intra_op_threads(engine):
    """The thread count the replica passes reaches ONNX Runtime's session options."""
    for key in engine.manifest.graphs:
        assert engine.backend.session(key).get_session_options().intra_op_num_threads == 1


def test_one_request_equals_engine(server, engine):
    client, _, _ = server
    (hw,) = _sizes(engine, 1)
    img = _image(0, hw)
    _check_image_response(engine, *_post(client, img, 7), img, 7)
    status, headers, body = client.request("POST", "/v1/superres?seed=7", _png(img), {"Accept": "image/jpeg"})
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    # a JPEG input: its size is read from the JPEG frame header, the pixels as OpenCV decodes them
    from runtime import io as rio

    jpeg = rio.encode_image(img, ".jpg")
    status, headers, body = client.request("POST", "/v1/superres?seed=7", jpeg, {"Content-Type": "image/jpeg"})
    _check_image_response(engine, status, headers, body, rio.decode_image(jpeg), 7)


def test_json_request_with_x2_and_style_cache(server, engine):
    client, _, _ = server
    (hw,) = _sizes(engine, 1)
    x2 = _image(11, (256, 256))
    doc = {"image": "", "x2": base64.b64encode(_png(x2)).decode(), "seed": 4}
    seen = []
    for i in range(2):  # two frames of a clip, one x2: the second pays no style
        img = _image(20 + i, hw)
        doc["image"] = base64.b64encode(_png(img)).decode()
        status, headers, body = client.request("POST", "/v1/superres", json.dumps(doc).encode(),
                                               {"Content-Type": "application/json"})
        _check_image_response(engine, status, headers, body, img, 4, x2=x2)
        seen.append(headers["x-sgex-style-cache"])
    assert seen[1] == "hit"


def test_concurrent_requests_are_batched_by_size(server, engine):
    client, _, _ = server
    sizes = _sizes(engine, 2)
    work = [(_image(100 + i, sizes[i % 2]), i) for i in range(4)]  # two of each size, interleaved
    before = json.loads(client.request("GET", "/healthz")[2])
    with cf.ThreadPoolExecutor(len(work)) as ex:
        answers = list(ex.map(lambda w: _post(client, *w), work))
    after = json.loads(client.request("GET", "/healthz")[2])
    batches: dict[str, set] = {}
    for (img, seed), (status, headers, body) in zip(work, answers):
        _check_image_response(engine, status, headers, body, img, seed)
        batches.setdefault(headers["x-sgex-batch-id"], set()).add(img.shape)
        assert 1 <= int(headers["x-sgex-batch-size"]) <= MAX_BATCH
    assert all(len(shapes) == 1 for shapes in batches.values()), f"a batch mixed sizes: {batches}"
    requests = after["requests"] - before["requests"]
    calls = after["engine_calls"] - before["engine_calls"]
    assert requests == len(work)
    assert calls == len(batches) < len(work), f"{calls} engine calls for {requests} requests: not batched"


def test_face_pipeline_options_pass_through(server, engine, astronaut):
    """align=true: the face pipeline (detect, crop, align; paste-back) as Engine.process_photo,
    byte for byte. The crop is made small (padding) so the tiny export's bucket holds it."""
    pytest.importorskip("dlib")
    from runtime.pipeline import FaceOptions

    client, _, _ = server
    side = max(b.max_input for b in engine.buckets)  # the largest x1 side the export holds
    pad = (side // 2,) * 4
    query = f"padding={','.join(map(str, pad))}"
    scale = engine.spec.variant(engine.variant).scales[0]  # the server's default, as sgex-run's
    for paste in (False, True):
        status, headers, body = client.request(
            "POST", f"/v1/superres?seed=5&align=true&paste_back={str(paste).lower()}&{query}", _png(astronaut))
        assert status == 200, body[:300]
        want = engine.process_photo(astronaut, FaceOptions(padding=pad, paste_back=paste), seed=5, scale=scale).image
        assert body == _png(want)
        assert headers["x-sgex-faces"] == "1"
    status, _, body = client.request("POST", "/v1/superres?align=true", _png(_image(3, (64, 64))))
    assert status == 400 and "face" in json.loads(body)["error"]
    status, _, body = client.request("POST", "/v1/superres?paste_back=true", _png(astronaut))
    assert status == 400 and "align=true" in json.loads(body)["error"]


def test_bad_inputs(server, engine):
    client, _, _ = server
    (hw,) = _sizes(engine, 1)
    png = _png(_image(1, hw))
    cases = [
        ({"body": b"not an image"}, 400, "not a PNG or JPEG"),
        ({"body": png[: len(png) // 2]}, 400, "image"),
        ({"body": _rgba_png(hw)}, 400, "3 channels"),
        ({"body": png, "query": "?seed=-1"}, 400, "seed"),
        ({"body": png, "query": "?seed=x"}, 400, "seed"),
        ({"body": png, "query": "?scale=5"}, 400, "scale"),
        ({"body": png, "query": "?edit_scale=1"}, 400, "edit only"),
        ({"body": png, "query": "?colour=1"}, 400, "unknown option"),
        ({"body": b"{", "headers": {"Content-Type": "application/json"}}, 400, "JSON"),
        ({"body": b'{"image": "@@"}', "headers": {"Content-Type": "application/json"}}, 400, "base64"),
        ({"body": b"", }, 400, "empty"),
        ({"body": b"\0" * (MAX_BODY + 1)}, 413, "limit"),
        ({"body": _png_header_only(5000, 5000)}, 413, "pixels"),
        ({"body": _png(_image(2, (max(b.max_input for b in engine.buckets) + 8,) * 2))}, 413, "bucket"),
        ({"body": png, "headers": {"Accept": "text/html"}}, 406, "Accept"),
    ]
    for case, want, text in cases:
        status, headers, body = client.request("POST", "/v1/superres" + case.get("query", ""), case["body"],
                                               case.get("headers"))
        assert status == want, (case.get("query"), body[:200])
        err = json.loads(body)["error"]
        assert text in err, err
    status, _, body = client.request("POST", "/v1/toonify", png)
    assert status == 404 and "not served here" in json.loads(body)["error"]
    status, _, body = client.request("GET", "/v1/superres")
    assert status == 405
    status, _, _ = client.request("GET", "/healthz")
    assert status == 200
    stats = json.loads(client.request("GET", "/healthz")[2])
    assert stats["errors_5xx"] == 0


def _rgba_png(hw) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.full((*hw, 4), 128, np.uint8))
    assert ok
    return buf.tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk that announce width x height (no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_saturated_queue_answers_503_with_retry_after(server, engine):
    client, _, _ = server
    (hw,) = _sizes(engine, 1)
    n = 4 * (MAX_ONGOING + MAX_QUEUED)
    work = [(_image(200 + i, hw), i) for i in range(n)]
    with cf.ThreadPoolExecutor(n) as ex:
        answers = list(ex.map(lambda w: _post(client, *w), work))
    refused = [a for a in answers if a[0] == 503]
    assert refused, "no request was refused although more were sent than the replica and queue hold"
    assert all(h.get("retry-after") == "2" for _, h, _ in refused)
    served = [(w, a) for w, a in zip(work, answers) if a[0] != 503]
    assert len(served) >= MAX_ONGOING
    for (img, seed), (status, headers, body) in served:
        _check_image_response(engine, status, headers, body, img, seed)


def test_zz_shutdown_leaves_no_process(server):
    """Runs after the HTTP tests (pytest keeps file order): SIGTERM ends the server, Serve, Ray and every
    process they started."""
    client, proc, raydir = server
    kids = _descendants(proc.pid)
    assert kids, "sgex-serve started no Ray processes?"
    assert _cmdlines_with(raydir), "the Ray processes do not run under the test's RAY_TMPDIR"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(_alive(p) for p in kids) or _cmdlines_with(raydir)):
        time.sleep(0.5)
    left = [p for p in kids if _alive(p)]
    assert not left and not _cmdlines_with(raydir), (left, _cmdlines_with(raydir))
    with pytest.raises(OSError):
        client.request("GET", "/healthz")


def test_cli_refuses_bad_arguments_before_ray_starts(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, text in ((["--artifacts", str(tmp_path / "nope")], "does not exist"),
                       (["--artifacts", str(tmp_path), "--max-batch", "0"], "--max-batch"),
                       (["--artifacts", str(tmp_path)], "manifest.json")):
        r = subprocess.run([sys.executable, "-m", "runtime.serve", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sgex-serve: error:") and text in lines[0], r.stderr


async def _asgi_post(srv, path: str, query: bytes, body: bytes):
    """POST `body` to an in-process SgexServer (no Ray cluster, no HTTP)."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "query_string": query,
             "headers": [(b"content-length", str(len(body)).encode())]}
    return await srv(Request(scope, receive))


def test_internal_failure_is_500_with_an_id_in_the_log(tiny_superres_export, monkeypatch, caplog):
    """In process (no Ray cluster): an Engine failure inside a batch answers 500 with an id, and
    the same id with the traceback is in the log; an SgexError there is a 500 too, since every
    input of a batch was validated before it and a batch holds several users' requests. Ray's
    check that serve.batch runs inside a replica is switched off for this direct call."""
    import asyncio
    import logging
    import traceback

    import ray.serve.batching as batching

    from runtime import io as rio
    from runtime import serve as rs
    from runtime.errors import SgexError

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    srv = rs.SgexServer(rs.ServeConfig(artifacts=str(tiny_superres_export), max_batch=1, max_ongoing=2,
                                       batch_wait_ms=0).__dict__)
    body = rio.encode_image(np.zeros((16, 16, 3), np.uint8), ".png")

    def call():
        return _asgi_post(srv, "/v1/superres", b"seed=1", body)

    failures = (RuntimeError("disk on fire"), SgexError("backend lost its session"))

    async def each():  # one event loop: serve.batch binds its queues to the loop of first use
        out = []
        for exc in failures:
            def fail(*args, _exc=exc, **kwargs):
                raise _exc

            srv.engine.synthesize = fail
            out.append(await asyncio.wait_for(call(), 120))
        return out

    with caplog.at_level(logging.ERROR, logger="sgex-serve"):
        answers = asyncio.run(each())
    for exc, r in zip(failures, answers):
        assert r.status_code == 500
        doc = json.loads(r.body)
        assert len(doc["id"]) == 32 and "internal error" in doc["error"]
        logged = [rec for rec in caplog.records if doc["id"] in rec.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None
        assert str(exc) in "".join(traceback.format_exception(*logged[0].exc_info))
    assert srv.stats()["errors_5xx"] == 2 and srv.stats()["errors_4xx"] == 0


def test_openvino_backend_in_process(tiny_superres_export, tmp_path, monkeypatch):
    """--backend openvino --precision fp32: the replica's Engine runs OpenVINO with the replica's
    threads, and a request's answer equals that Engine's output byte for byte (in process, as the
    500 test above); --precision without openvino is refused before anything starts."""
    pytest.importorskip("openvino")
    import asyncio
    import shutil

    import ray.serve.batching as batching

    from runtime import serve as rs
    from runtime.engine import Engine
    from runtime.errors import SgexError

    art = tmp_path / "superres"  # a copy: OpenVINO writes its compiled-model cache next to the graphs
    shutil.copytree(tiny_superres_export, art)
    tiny_superres_export = art
    with pytest.raises(SgexError, match="--precision bf16 is for --backend openvino"):
        rs.ServeConfig(artifacts=str(tiny_superres_export), backend="ort", precision="bf16").check()
    args = rs.build_parser().parse_args(["--artifacts", str(tiny_superres_export), "--backend", "openvino",
                                         "--precision", "fp32", "--num-cpus", "1"])
    cfg = rs.config_from_args(args)
    assert (cfg.backend, cfg.precision, cfg.intra_op_threads()) == ("openvino", "fp32", 1)
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    srv = rs.SgexServer(rs.ServeConfig(**{**cfg.__dict__, "max_batch": 1, "max_ongoing": 2,
                                          "batch_wait_ms": 0}).__dict__)
    assert srv.engine.backend.name == "openvino" and srv.stats()["intra_op_threads"] == 1
    img = _image(3, (16, 16))
    body = _png(img)

    r = asyncio.run(_asgi_post(srv, "/v1/superres", b"seed=5", body))
    assert r.status_code == 200 and r.headers["x-sgex-backend"] == "openvino"
    ref = Engine(tiny_superres_export, backend="openvino", precision="fp32", intra_op_threads=1)
    assert r.body == _png(ref.process(img, seed=5))
