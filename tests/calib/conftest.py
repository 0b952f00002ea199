"""Shared, cached FP32 exports for the calibration tests (export is the cost: each export_task of
a tiny model is tens of seconds, so every test reuses one export per task and checkpoint)."""

from __future__ import annotations

import pytest

RES = 128  # calibration bucket of the tests (output side; x1 up to 32)


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory, tiny_ckpt):
    """fp32_export(task, latent_scale=1.0) -> task directory of an FP32 portable export at RES
    of the tiny random checkpoint (seed 0), optionally with latent_avg scaled."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("calib-exports")

    def make(task: str, latent_scale: float = 1.0) -> str:
        key = (task, latent_scale)
        if key not in cache:
            from export.onnx import export_task

            ckpt = tiny_ckpt(task)
            if latent_scale != 1.0:
                import torch

                obj = torch.load(ckpt, weights_only=True)
                obj["latent_avg"] = obj["latent_avg"] * latent_scale
                ckpt = str(root / f"{task}-latent-x{latent_scale:g}.pt")
                torch.save(obj, ckpt)
            out = root / f"{task}-x{latent_scale:g}"
            export_task(task, RES, ckpt=ckpt, out=str(out), progress=False)
            cache[key] = str(out / task)
        return cache[key]

    return make
