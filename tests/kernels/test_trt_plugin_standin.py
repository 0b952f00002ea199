"""TensorRT's own plugin layer (tensorrt-cu13-bindings 11.4) run on sgex's plugin definitions.

Default CPU run; needs the `trt-bindings` extra (the bindings wheel, no TensorRT libraries) and
gcc/g++, and skips with the reason otherwise. TensorRT's native module is loaded with STAND-IN
libraries compiled by this test (see trt_standin.py for exactly what they are and what this
proves): TensorRT's validation and template code accept sgex's registration (twice in one
process), attributes as the ONNX parser passes them under the installed NumPy, the shape function,
format combinations, tactics and AOT launch parameters. It does not build or run an engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import trt_standin  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["dilation", "padding", "demodulate", "activate", "has_noise", "has_bias"]

pytestmark = pytest.mark.skipif(trt_standin.missing_tools() is not None,
                                reason=f"stand-in TensorRT check: {trt_standin.missing_tools()}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    pkg = trt_standin.bindings_dir()
    libdir = trt_standin.build(tmp_path_factory.mktemp("trt-standin-libs"), trt_standin.bindings_major(pkg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(trt_standin.__file__)), str(libdir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_register_twice_reaches_the_registry_once(report):
    assert report["tensorrt_bindings"].startswith("11.")
    assert report["registry"] == ["sgex"]  # registerCreator reached the stand-in registry once
    assert "sgex::FusedModulatedConv2d" in report["qdp_registry"]
    assert report["creator"] == ["_TemplatePluginCreator", "FusedModulatedConv2d", "sgex"]
    assert report["field_names"] == [[f, "PluginFieldType.INT32"] for f in FIELDS]


def test_validator_is_live(report):
    # The defect the plugin had, on a throwaway plugin id: TensorRT's validation really ran above.
    assert "No return annotation found for aot_impl" in report["unannotated_aot_impl"]


@pytest.mark.parametrize("mode,cls", [("aot", "_TemplateAOTPlugin"), ("jit", "_TemplateJITPlugin")])
def test_parser_fields_shape_formats_tactics(report, mode, cls):
    r, node = report[mode], report["node_attrs"]
    assert r["class"] == r["clone_class"] == cls
    # one-element int32 arrays, each the value of its own node attribute (node order differs)
    assert r["attrs"] == {f: ["int32", [node[f]]] for f in FIELDS}
    assert list(r["attrs"]) == FIELDS
    assert r["output_types"] == ["DataType.HALF"]
    assert r["output_shape"] == r["expected_shape"]
    assert r["n_format_entries"] == 3 * 7  # three type combinations x (6 inputs + 1 output)
    assert r["tactics"] == [1, 2, 3, 4]
    if mode == "jit":
        assert r["serialized"] == [[f, [node[f]]] for f in FIELDS]


def test_aot_launch_parameters(report):
    launch = report["aot"]["launch"]
    assert sorted(launch) == [str(t) for t in trt_standin.LAUNCH_TACTICS]
    for tactic, t in launch.items():
        assert [k for k, _ in t["stored"]] == sorted(["grid_x", "grid_y", "grid_z", "block_x", "block_y",
                                                      "block_z", "shared_mem"])
        assert {kind for _, kind in t["stored"]} == {"SymExprImpl"}, tactic
        assert t["grid"] == t["expected_grid"], tactic
        assert t["block"] == [t["expected_block_x"], 1, 1], tactic
        assert 0 < t["shared_mem"] <= 48 * 1024
        assert t["n_sym"] == 6 and t["sym_kinds"] == ["SymExprImpl"] * 6
        assert t["extra"] == t["expected_extra"], tactic
        assert t["n_ptx_params"] == 13 and t["ptx_target"].startswith("sm_90")
        assert t["kernel_name"]
