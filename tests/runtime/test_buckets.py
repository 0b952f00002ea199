"""runtime.buckets: buckets are named by the output side; x1 sides are multiples of 8 up to R/4."""

from __future__ import annotations

import pytest

from runtime.buckets import DEFAULT_LADDER, Bucket, check_side, ladder, padded, pick, res_for


def test_bucket_holds_multiples_of_8_up_to_a_quarter_of_its_output_side():
    b = Bucket(1024)
    assert b.max_input == 256
    assert b.holds(256, 256) and b.holds(72, 88) and b.holds(8, 8) and b.holds(250, 3)  # 250 -> 256
    assert not b.holds(264, 264) and not b.holds(257, 8)  # 257 pads to 264


def test_pick_smallest_bucket_and_one_line_refusal_naming_the_bucket():
    bs = ladder()
    assert [b.side for b in bs] == list(DEFAULT_LADDER) == [512, 1024, 1536, 2048]
    assert pick(bs, 128, 128).side == 512
    assert pick(bs, 136, 64).side == 1024
    assert pick(bs, 512, 384).side == 2048  # the largest official crop
    with pytest.raises(ValueError) as e:
        pick([Bucket(1024)], 264, 264)
    msg = str(e.value)
    assert "\n" not in msg
    assert "x1 264x264" in msg and "largest exported bucket 1024 holds x1 up to 256x256" in msg
    assert "bucket 1056 would hold it (export it with --res 1056)" in msg


def test_profile_min_8_opt_and_max_at_a_quarter_of_the_output_side():
    p = Bucket(1024, max_batch=3).profile(opt_batch=2)
    assert p == {"min": (1, 8, 8), "opt": (2, 256, 256), "max": (3, 256, 256)}
    assert Bucket(1024).style_profile()["max"] == (4, 256, 256)


def test_res_rules():
    assert check_side(32) == 32 and check_side(1056) == 1056
    for bad in (0, 16, 100, 1000, 64.0, True):
        with pytest.raises(ValueError, match="--res is the output side: a multiple of 32"):
            check_side(bad)
    assert padded(72) == 72 and padded(73) == 80 and padded(1) == 8
    assert res_for(72, 88) == 352 and res_for(256, 255) == 1024
