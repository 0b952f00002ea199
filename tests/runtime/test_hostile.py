"""sgex as a hostile user tries it: each numbered case of issue 13 reproduced (the number is in the
test name), then cases of our own. The promises under test (README "Reliability"):

* a user error: one line on stderr, exit 2, before any model loads and before any log line;
* a failed or interrupted run leaves no new output and no temp file, and never replaces or damages
  an existing output;
* artifacts run only as hashed, from a manifest that fits the task table;
* an image's size is read from its header and refused above the pixel limit before decoding.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import io as rio
from runtime.errors import SgexError
from runtime.manifest import MANIFEST_NAME, Manifest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def sgex(module: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    code = f"import sys; from {module} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess, prog: str = "sgex-run") -> str:
    """The run failed with exit 2 and exactly one line on stderr, the error (no log line before it)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr
    return lines[0]


def png(path: Path, shape, seed=0) -> Path:
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return path


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A small, well-formed PNG whose IHDR declares width x height (8-bit RGB) and whose data
    decompresses to a few rows only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def artifacts(tmp_path, tiny_superres_export):
    """A private copy of the tiny superres export (bucket 1024: x1 up to 256, max batch 2) that a test may damage."""
    d = tmp_path / "art" / "superres"
    shutil.copytree(tiny_superres_export, d)
    return d


def edit_manifest(d: Path, change) -> None:
    p = d / MANIFEST_NAME
    data = json.loads(p.read_text())
    change(data)
    p.write_text(json.dumps(data))


TORCH_SR = ["--task", "superres", "--backend", "torch", "--random-weights", "--width-div", "4", "--no-align"]


# -- 1. disk full while writing an image ------------------------------------------------------------

def test_01_disk_full_simulated_keeps_existing_image(tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    out.write_bytes(b"the old result")
    real_write = os.write

    def full(fd, data):  # the kernel's answer on a full disk, after the first 100 bytes
        if os.fstat(fd).st_size >= 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[:100])

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SgexError, match="writing failed .*No space left on device.*existing file is unchanged") as e:
        rio.write_image(out, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert "\n" not in str(e.value)
    assert out.read_bytes() == b"the old result" and listing(tmp_path) == ["out.png"]


def test_01_fsync_failure_keeps_existing_image(tmp_path, monkeypatch):
    """Delayed allocation: ENOSPC can come from fsync after every write succeeded."""
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SgexError, match="No space left on device"):
        rio.write_image(out, np.zeros((8, 8, 3), np.uint8))
    assert out.read_bytes() == b"old" and listing(tmp_path) == ["out.png"]


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB tmpfs (needs mount rights, e.g. root; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC path is covered by the simulated tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_01_disk_full_real_filesystem_cli(tmp_path, tiny_fs):
    src = png(tmp_path / "in.png", (48, 48, 3))  # -> 192x192 of random-weight noise, far over 8 KiB as PNG
    out = tiny_fs / "out.png"
    out.write_bytes(b"old result")
    (tiny_fs / "filler").write_bytes(os.urandom(52 << 10))  # leaves 2 pages (8 KiB) free
    r = sgex("runtime.cli", *TORCH_SR, "--input", str(src), "--output", str(out))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("sgex-run: error: ") and "No space left on device" in err and "Traceback" not in r.stderr
    assert out.read_bytes() == b"old result" and sorted(p.name for p in tiny_fs.iterdir()) == ["filler", "out.png"]


# -- 3. a folder run that fails part-way -------------------------------------------------------------

def test_03_folder_bucket_misfit_refused_before_any_result(tmp_path, artifacts):
    (tmp_path / "in").mkdir()
    png(tmp_path / "in" / "a.png", (16, 16, 3))
    png(tmp_path / "in" / "b.png", (264, 264, 3))  # x1 larger than the 1024 bucket holds (256)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"existing a")
    line = one_error_line(sgex("runtime.cli", "--task", "superres", "--artifacts", str(artifacts), "--no-align",
                               "--input", str(tmp_path / "in"), "--output", str(out)))
    assert "b.png" in line and "bucket" in line
    assert listing(out) == ["a.png"] and (out / "a.png").read_bytes() == b"existing a"


def test_03_folder_failure_during_run_leaves_nothing_new(tmp_path, monkeypatch):
    from runtime import cli
    from runtime.engine import Engine

    (tmp_path / "in").mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        png(tmp_path / "in" / name, (16, 16, 3), i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"existing a")
    calls = []
    real = Engine.process

    def fail_on_second(self, image, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise SgexError("simulated failure on the second image")
        return real(self, image, **kw)

    monkeypatch.setattr(Engine, "process", fail_on_second)
    assert cli.main([*TORCH_SR, "--input", str(tmp_path / "in"), "--output", str(out)]) == 2
    assert len(calls) == 2
    assert listing(out) == ["a.png"] and (out / "a.png").read_bytes() == b"existing a"
    # a folder this run created is removed again
    calls.clear()
    assert cli.main([*TORCH_SR, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_03_folder_success_commits_every_result(tmp_path):
    from runtime import cli

    (tmp_path / "in").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        png(tmp_path / "in" / name, (16, 16, 3), i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"old")
    assert cli.main([*TORCH_SR, "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert listing(out) == ["a.png", "b.png"]
    assert rio.read_image(out / "a.png").shape == (64, 64, 3)


# -- 4. SIGTERM during an export and during a folder run ------------------------------------------------

def _terminate_when(p: subprocess.Popen, ready, what: str, limit: float = 240.0) -> str:
    t0 = time.monotonic()
    while not ready():
        if p.poll() is not None:
            raise AssertionError(f"finished before {what}: {p.communicate()[1]}")
        if time.monotonic() - t0 > limit:
            p.kill()
            raise AssertionError(f"{what} never happened")
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return err


def test_04_sigterm_export_removes_its_staging_folder(tmp_path):
    out = tmp_path / "artifacts"
    code = ("import sys; from runtime._cli import run_main; from export.onnx import export_task\n"
            "sys.exit(run_main('sgex-export', lambda: export_task('superres', 32, random_weights=True, "
            f"width_div=4, out={str(out)!r}, progress=False) and 0))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    err = _terminate_when(p, lambda: out.exists() and any(out.glob(".sgex-export-*")), "staging")
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not out.exists()  # the run created it, so it removed it: no staging folder left


def test_04_sigterm_folder_run_leaves_no_output(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(40):
        png(tmp_path / "in" / f"{i:02d}.png", (32, 32, 3), i)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())",
                          *TORCH_SR, "--input", str(tmp_path / "in"), "--output", str(out)],
                         cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    err = _terminate_when(p, lambda: out.exists() and any(f.suffix == ".png" for f in out.rglob("*")),
                          "a staged result")
    assert p.returncode == 128 + signal.SIGTERM, err
    assert not out.exists()


# -- 5. --edit-scale nan / inf ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_05_edit_scale_not_finite(tmp_path, value):
    src = png(tmp_path / "in.png", (16, 16, 3))
    line = one_error_line(sgex("runtime.cli", "--task", "edit", "--random-weights", "--width-div", "4",
                               "--input", str(src), "--output", str(tmp_path / "o.png"), f"--edit-scale={value}"))
    assert "--edit-scale" in line and "finite" in line
    assert not (tmp_path / "o.png").exists()


def test_05_api_edit_scale_not_finite(tiny_superres_export):
    from runtime.engine import Engine

    eng = Engine(tiny_superres_export, backend="ort")
    x1 = np.zeros((1, 16, 16, 3), np.uint8)
    w = np.zeros((1, 18, eng.style_dim), np.float32)
    for bad in (float("nan"), float("inf"), "2", None):
        with pytest.raises(SgexError, match="edit_scale must be a finite number"):
            eng.synthesize(x1, w, edit_scale=bad)


# -- 6. a graph changed after the Engine verified the directory ------------------------------------------

def test_06_graph_changed_after_verify_is_not_run(artifacts):
    from runtime.engine import Engine

    eng = Engine(artifacts, backend="ort")  # every hash checked here
    p = artifacts / "1024" / "synth.onnx"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(SgexError, match=r"synth\.onnx: sha256 does not match the manifest"):
        eng.process(np.zeros((16, 16, 3), np.uint8))


# -- 7. manifest.json itself tampered ----------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(task="toonify"), "variant 'sr' is not a variant of task 'toonify'"),
    (lambda d: d.update(task="toonify", variant="pixar"), "noise 'explicit' does not fit task 'toonify'"),
    (lambda d: d.update(task="edit", variant="age", noise="zero"), r"inputs are \['x1', 'wplus', 'noise_0'"),
    (lambda d: d.update(task="inversion", variant="inversion"), None),  # same graph I/O: allowed, see below
    (lambda d: d["graphs"]["synth@1024"]["inputs"][0].update(name="x"), r"inputs are \['x', 'wplus'"),
    (lambda d: d["graphs"]["synth@1024"]["inputs"][0].update(shape=["batch", 19, "height", "width"]),
     r"x1: shape \['batch', 19, 'height', 'width'\] does not fit"),
    (lambda d: d["graphs"]["style"]["outputs"][0].update(shape=["batch", 18, 512]), "wplus: shape"),
    (lambda d: d["graphs"].update({"translate@1024": d["graphs"].pop("synth@1024")}), "has no such graph"),
    (lambda d: d.update(style_dim=100), "style_dim 100"),
])
def test_07_manifest_checked_against_the_task_table(artifacts, change, match):
    edit_manifest(artifacts, change)
    if match is None:
        # inversion and superres share every graph input and output: the table cannot tell them
        # apart, so the manifest is accepted (its task is then what it says; README states it)
        Manifest.load(artifacts)
        return
    with pytest.raises(SgexError, match=match):
        Manifest.load(artifacts)


def test_07_cli_refuses_manifest_of_another_task(tmp_path, artifacts):
    edit_manifest(artifacts, lambda d: d.update(task="toonify"))
    line = one_error_line(sgex("runtime.cli", "--task", "toonify", "--artifacts", str(artifacts), "--no-align",
                               "--input", str(png(tmp_path / "i.png", (16, 16, 3))), "--output", str(tmp_path / "o.png")))
    assert "not a variant of task 'toonify'" in line


# -- 8. wrong-typed manifest fields ------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(graphs=list(d["graphs"].values())), "graphs must be dict, got list"),
    (lambda d: d.update(files=[]), "files must be dict, got list"),
    (lambda d: d["graphs"]["style"].update(file=7), "graphs['style'].file must be str, got int"),
    (lambda d: d["graphs"]["style"].update(inputs="x2"), "graphs['style'].inputs must be list, got str"),
    (lambda d: d["graphs"]["synth@1024"]["bucket"].update(side="abc"), "bucket.side must be int, got str"),
    (lambda d: d["graphs"]["synth@1024"]["bucket"].update(side=100), "bucket.side is 100, but the key says 1024"),
    (lambda d: d["graphs"].update({"synth@100": {**d["graphs"].pop("synth@1024"), "bucket": {"side": 100, "max_batch": 2}}}),
     "the bucket side is the output side: a multiple of 32"),
    (lambda d: d.update(style_dim="128"), "style_dim must be int, got str"),
    (lambda d: d.update(style_dim=True), "style_dim must be int, got bool"),
    (lambda d: d["checkpoint"].update(random="yes"), "checkpoint.random must be bool, got str"),
    (lambda d: d["graphs"]["style"].update(sha256=12), "sha256 must be str, got int"),
    (lambda d: d["graphs"]["style"].update(sha256="zz"), "is not a sha256"),
    (lambda d: d["graphs"]["style"]["inputs"].__setitem__(0, "x2"), "inputs[0] must be an object"),
    (lambda d: d.update(engines={"synth@64": {"file": "64/synth.engine", "sha256": "0" * 64}}), "engine of no graph"),
    (lambda d: d.update(extra_field=1), "unknown manifest field 'extra_field'"),
    (lambda d: d.update(checkpoint=None), "checkpoint must be dict, got NoneType"),
])
def test_08_manifest_schema_names_the_field(artifacts, change, field):
    edit_manifest(artifacts, change)
    with pytest.raises(SgexError) as e:
        Manifest.load(artifacts)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and "--res" not in msg, msg


def test_08_optional_fields_are_allowed(artifacts):
    edit_manifest(artifacts, lambda d: d.update(plan={"rules": []}))
    assert Manifest.load(artifacts).data["plan"] == {"rules": []}


# -- 9. an image that declares a huge size ----------------------------------------------------------

@pytest.mark.parametrize("side", [30000, 100000])
def test_09_huge_png_refused_from_its_header(tmp_path, side):
    p = png_declaring(tmp_path / "huge.png", side, side)
    assert p.stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(SgexError, match=rf"declares {side}x{side} = {side * side} pixels, above sgex's limit "
                                        rf"of {rio.MAX_IMAGE_PIXELS}"):
        rio.read_image(p)
    assert time.perf_counter() - t0 < 1.0  # nothing decoded


def test_09_huge_png_cli_one_line(tmp_path):
    p = png_declaring(tmp_path / "huge.png", 100000, 100000)
    line = one_error_line(sgex("runtime.cli", *TORCH_SR, "--input", str(p), "--output", str(tmp_path / "o.png")))
    assert "above sgex's limit" in line and "cv2" not in line


def test_09_at_the_limit_is_read(tmp_path):
    p = png(tmp_path / "wide.png", (1, 1 << 14, 3))  # 16384 pixels: far under the limit, odd shape
    assert rio.read_image(p).shape == (1, 1 << 14, 3)


# -- 10. sgex-export --res beyond what a machine holds ------------------------------------------------------

def test_10_export_res_upper_bound(tmp_path, capsys):
    from export.cli import main
    from runtime.buckets import MAX_SIDE

    out = tmp_path / "out"
    assert main(["--task", "superres", "--res", "99968", "--random-weights", "--out", str(out)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"--res must be at most {MAX_SIDE}" in lines[0], lines
    assert not out.exists()
    assert f"up to {MAX_SIDE}" in " ".join(subprocess.run(
        [sys.executable, "-c", "from export.cli import main; main(['--help'])"], cwd=ROOT, env=ENV,
        capture_output=True, text=True).stdout.split())


# -- 11. sgex-export without torch or onnx ------------------------------------------------------------

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == {mod!r}:
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mod, extra", [("torch", "torch"), ("onnx", "onnx"), ("onnxscript", "onnx")])
def test_11_export_without_torch_or_onnx(tmp_path, mod, extra):
    r = subprocess.run([sys.executable, "-c", BLOCK.format(mod=mod), "--task", "superres", "--res", "32",
                        "--random-weights", "--out", str(tmp_path / "o")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    line = one_error_line(r, "sgex-export")
    assert "is not installed" in line and f"sgex[{extra}]" in line
    assert not (tmp_path / "o").exists()


# -- 12. a 254-byte output name ----------------------------------------------------------------------

def test_12_longest_output_names(tmp_path):
    for n in (251, 255):  # the name with its ".png": 255 is NAME_MAX on ext4/tmpfs
        out = tmp_path / ("a" * (n - 4) + ".png")
        rio.write_image(out, np.zeros((4, 4, 3), np.uint8))
        assert rio.read_image(out).shape == (4, 4, 3)
    assert len(list(tmp_path.iterdir())) == 2


def test_12_longest_output_name_cli(tmp_path):
    src = png(tmp_path / "in.png", (8, 8, 3))
    out = tmp_path / ("b" * 250 + ".png")  # 254 bytes
    r = sgex("runtime.cli", *TORCH_SR, "--input", str(src), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert rio.read_image(out).shape == (32, 32, 3)


# -- 13. errors found late, and native libraries' chatter ------------------------------------------------

@pytest.mark.parametrize("case", ["bucket_too_small", "scale_0", "scale_7", "scale_-4", "scale_sr32_only",
                                  "seed_-1", "trt_without_engines", "device_typo"])
def test_13_late_errors_come_first_and_alone(tmp_path, artifacts, case):
    src = png(tmp_path / "in.png", (264, 264, 3) if case == "bucket_too_small" else (8, 8, 3))
    extra = {"bucket_too_small": [], "scale_0": ["--scale", "0"], "scale_7": ["--scale", "7"],
             "scale_-4": ["--scale=-4"], "scale_sr32_only": ["--scale", "8", "--variant", "sr32"],
             "seed_-1": ["--seed=-1"], "trt_without_engines": ["--backend", "trt"],
             "device_typo": ["--device", "gpu"]}[case]
    word = {"bucket_too_small": "largest exported bucket", "scale_0": "--scale 0", "scale_7": "--scale 7",
            "scale_-4": "--scale -4", "scale_sr32_only": "variant", "seed_-1": "--seed",
            "trt_without_engines": "no TensorRT engines", "device_typo": "--device"}[case]
    line = one_error_line(sgex("runtime.cli", "--task", "superres", "--artifacts", str(artifacts), "--no-align",
                               "--input", str(src), "--output", str(tmp_path / "o.png"), *extra))
    assert word in line, line
    assert not (tmp_path / "o.png").exists()


def test_13_torch_path_late_errors_first(tmp_path):
    src = png(tmp_path / "in.png", (8, 8, 3))
    for extra, word in ((["--seed=-1"], "--seed"), (["--scale", "7"], "--scale 7")):
        line = one_error_line(sgex("runtime.cli", *TORCH_SR, "--input", str(src), "--output", str(tmp_path / "o.png"), *extra))
        assert word in line


@pytest.mark.parametrize("fmt", [".png", ".jpg"])
def test_13_truncated_image_one_line_no_native_warning(tmp_path, fmt):
    full = tmp_path / f"full{fmt}"
    assert cv2.imwrite(str(full), np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / f"cut{fmt}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    r = sgex("runtime.cli", *TORCH_SR, "--input", str(cut), "--output", str(tmp_path / "o.png"))
    if r.returncode == 0:  # libjpeg fills a truncated JPEG with grey: a valid decode, but nothing on stderr
        assert fmt == ".jpg" and "WARN" not in r.stderr and "Premature" not in r.stderr, r.stderr
        return
    assert "WARN" not in one_error_line(r)


# -- 14. the Python API raises SgexError, and --width-div says what it accepts ----------------------------

def test_14_api_bad_arguments_are_sgex_errors(tiny_superres_export):
    from runtime.engine import Engine

    eng = Engine(tiny_superres_export, backend="ort")
    img = np.zeros((16, 16, 3), np.uint8)
    for bad in ([[0, 0, 0]] * 4, None, "face.png", 3):
        with pytest.raises(SgexError, match="expected a numpy uint8 image"):
            eng.process(bad)
    for seed, match in ((-1, ">= 0"), (1.5, "integer"), (None, "integer"), ("3", "integer"), (True, "integer"),
                        ([1, -2], ">= 0"), ([1, 2], "2 seeds for a batch of 1")):
        with pytest.raises(SgexError, match=match):
            eng.process(img, seed=seed)
    with pytest.raises(SgexError, match="batch_size"):
        list(eng.process_video([img], batch_size=0))
    with pytest.raises(SgexError, match="frames must be an iterable"):
        list(eng.process_video(None))
    with pytest.raises(SgexError, match="artifacts_dir must be a path"):
        Engine(None)
    with pytest.raises(SgexError, match="device must be"):
        Engine(tiny_superres_export, device=0)
    assert eng.process(img, seed=np.int64(3)).shape == (64, 64, 3)


def test_14_from_checkpoint_bad_arguments():
    pytest.importorskip("torch")
    from runtime.engine import Engine

    for kw, match in ((dict(task="colorize"), "unknown task"), (dict(task=None), "unknown task"),
                      (dict(task="superres", random_weights=True, seed=-1), "seed"),
                      (dict(task="superres", random_weights=True, width_div=3), "width_div must be one of 1, 2, 4"),
                      (dict(task="superres", ckpt=5), "ckpt must be a path"),
                      (dict(task="superres", random_weights=True, variant="sr64"), "no variant 'sr64'")):
        with pytest.raises(SgexError, match=match):
            Engine.from_checkpoint(**kw)


def test_14_width_div_help_and_refusal(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from runtime.cli import main; main(['--help'])"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True)
    assert "one of 1, 2, 4" in " ".join(r.stdout.split())
    line = one_error_line(sgex("runtime.cli", "--task", "superres", "--random-weights", "--width-div", "3",
                               "--input", str(png(tmp_path / "i.png", (8, 8, 3))), "--output", str(tmp_path / "o.png")))
    assert "--width-div" in line


# -- our own cases ----------------------------------------------------------------------------------

def test_usage_error_is_one_line(tmp_path):
    line = one_error_line(sgex("runtime.cli", "--task", "superres", "--seed", "abc", "--input", "x", "--output", "y"))
    assert "--seed" in line


def _patched(path: Path, fmt: str, width: int, height: int) -> Path:
    """An image of format `fmt` whose header is rewritten to declare width x height."""
    ok, buf = cv2.imencode(fmt, np.zeros((8, 8, 3), np.uint8))
    b = bytearray(buf.tobytes())
    if fmt == ".bmp":
        b[18:26] = struct.pack("<ii", width, height)
    elif fmt == ".jpg":
        i = next(i for i in range(2, len(b) - 1) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2))
        b[i + 5:i + 9] = struct.pack(">HH", height, width)
    elif fmt == ".ppm":
        b = bytearray(f"P6\n{width} {height}\n255\n".encode()) + b[b.index(b"255\n") + 4:]
    elif fmt == ".tif":
        e = "<" if b[:2] == b"II" else ">"
        off = struct.unpack(e + "I", b[4:8])[0]
        n = struct.unpack(e + "H", b[off:off + 2])[0]
        for k in range(n):
            at = off + 2 + 12 * k
            tag = struct.unpack(e + "H", b[at:at + 2])[0]
            if tag in (256, 257):
                b[at + 2:at + 12] = struct.pack(e + "HI", 4, 1) + struct.pack(e + "I", width if tag == 256 else height)
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("fmt", [".bmp", ".jpg", ".ppm", ".tif"])
def test_huge_header_refused_in_every_format(tmp_path, fmt):
    p = _patched(tmp_path / f"huge{fmt}", fmt, 60000, 60000)
    with pytest.raises(SgexError, match="declares 60000x60000"):
        rio.read_image(p)


def test_webp_header_size(tmp_path):
    p = tmp_path / "x.webp"
    assert cv2.imwrite(str(p), np.zeros((20, 36, 3), np.uint8))
    assert (rio.image_header(p).width, rio.image_header(p).height) == (36, 20)


def test_sparse_giant_file_refused_unread(tmp_path):
    p = png_declaring(tmp_path / "giant.png", 64, 64)
    with open(p, "r+b") as f:
        f.truncate(rio.MAX_IMAGE_BYTES + 1)  # sparse: no disk used, never read
    with pytest.raises(SgexError, match="larger than any image sgex reads"):
        rio.read_image(p)


def test_folder_result_name_taken_by_a_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").mkdir()
    with pytest.raises(SgexError, match="is a directory"):
        with rio.staged_folder(tmp_path / "out") as stage:
            (stage / "a.png").write_bytes(b"a")
            (stage / "b.png").write_bytes(b"b")
    assert listing(tmp_path / "out") == ["b.png"]


def test_atomic_output_verify_refuses_before_rename(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old video")

    def verify(tmp):
        raise SgexError("re-opened: 1 frame, expected 10")

    with pytest.raises(SgexError, match="1 frame"):
        with rio.atomic_output(out, verify=verify) as tmp:
            tmp.write_bytes(b"broken")
    assert out.read_bytes() == b"old video" and listing(tmp_path) == ["v.mp4"]


def test_listed_file_changed_after_verify_is_refused(artifacts):
    """Files beside the graphs (editing_w.npy of an edit export) are read through read_verified too."""
    from runtime.manifest import sha256_file

    p = artifacts / "editing_w.npy"
    np.save(p, np.zeros((1, 18, 128), np.float32))
    edit_manifest(artifacts, lambda d: d["files"].update({"editing_w.npy": sha256_file(p)}))
    m = Manifest.load(artifacts)
    m.verify(artifacts)
    assert m.read_verified(artifacts, "editing_w.npy", kind="file") == p.read_bytes()
    p.write_bytes(p.read_bytes()[:-4] + b"\0\0\x80\x3f")
    with pytest.raises(SgexError, match=r"editing_w\.npy: sha256 does not match"):
        m.read_verified(artifacts, "editing_w.npy", kind="file")


def test_unknown_names_are_sgex_errors_and_key_errors():
    from runtime.tasks import get_task

    with pytest.raises(SgexError) as e:
        get_task("colorize")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("unknown task 'colorize'")
    with pytest.raises(KeyError):
        get_task("superres").variant("sr64")


def test_torch_cuda_missing_refused_before_weights_load(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = one_error_line(sgex("runtime.cli", *TORCH_SR, "--device", "cuda", "--input",
                               str(png(tmp_path / "i.png", (8, 8, 3))), "--output", str(tmp_path / "o.png")))
    assert "no CUDA device" in line
