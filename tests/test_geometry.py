import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from backend.labeling.geometry import (
    percent_to_points,
    percent_xywh_to_xyxy,
    points_to_percent,
    xyxy_to_percent_xywh,
)


def test_non_square_image_hand_computed():
    # 640x480: box from (64, 48) to (320, 240) is 10% / 10% with 40% x 40% size.
    pct = xyxy_to_percent_xywh(np.array([[64, 48, 320, 240]]), 640, 480)
    np.testing.assert_allclose(pct, [[10, 10, 40, 40]])
    # The same pixels on a portrait 480x640 image are different percents.
    pct = xyxy_to_percent_xywh(np.array([[64, 48, 320, 240]]), 480, 640)
    np.testing.assert_allclose(pct, [[64 / 4.8, 7.5, 256 / 4.8, 30]])


def test_boxes_are_clipped_to_the_image():
    pct = xyxy_to_percent_xywh(np.array([[-10, -5, 700, 100]]), 640, 480)
    np.testing.assert_allclose(pct, [[0, 0, 100, 100 / 4.8]])


@given(
    w=st.integers(8, 4000), h=st.integers(8, 4000),
    fx=st.floats(0, 0.5), fy=st.floats(0, 0.5), fw=st.floats(0.01, 0.5), fh=st.floats(0.01, 0.5),
)
def test_round_trip(w, h, fx, fy, fw, fh):
    xyxy = np.array([[fx * w, fy * h, (fx + fw) * w, (fy + fh) * h]])
    back = percent_xywh_to_xyxy(xyxy_to_percent_xywh(xyxy, w, h), w, h)
    np.testing.assert_allclose(back, xyxy, atol=1e-6 * max(w, h))


def test_points_round_trip_and_clip():
    pts = np.array([[0, 0], [320, 240], [700, -3]])
    pct = points_to_percent(pts, 640, 480)
    np.testing.assert_allclose(pct, [[0, 0], [50, 50], [100, 0]])
    np.testing.assert_allclose(percent_to_points(pct[:2], 640, 480), pts[:2])
