"""Fixtures of the face tests: the public-domain astronaut photo and its detection, once per
session (dlib takes about 0.2 s a call on the shared 2-core machine)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def astronaut():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()


@pytest.fixture(scope="session")
def found(astronaut):
    pytest.importorskip("dlib")
    from runtime import faces

    return faces.detect(astronaut)
