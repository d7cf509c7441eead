import numpy as np
import pytest

from giseg.data.rle import RLEError, decode_rle, encode_rle


@pytest.mark.parametrize("shape", [(266, 266), (310, 360), (1, 7), (5, 1)])
def test_round_trip_is_exact_on_random_masks(shape):
    rng = np.random.default_rng(0)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = (rng.random(shape) < density).astype(np.uint8)
        code = encode_rle(mask)
        np.testing.assert_array_equal(decode_rle(code, shape), mask)
        assert encode_rle(decode_rle(code, shape)) == code


def test_decode_is_row_major_and_one_indexed():
    mask = decode_rle("2 3 9 2", (3, 4))  # flat = row * W + col with W = 4
    expected = np.zeros((3, 4), np.uint8)
    expected[0, 1:4] = 1  # pixels 2, 3, 4
    expected[2, 0:2] = 1  # pixels 9, 10
    np.testing.assert_array_equal(mask, expected)


def test_encode_known_mask():
    mask = np.zeros((2, 3), np.uint8)
    mask[0, 2] = mask[1, 0] = mask[1, 1] = 1
    assert encode_rle(mask) == "3 3"  # pixels 3, 4, 5 form one run across the row end


@pytest.mark.parametrize("empty", ["", "  ", None, float("nan")])
def test_empty_code_is_empty_mask(empty):
    assert decode_rle(empty, (4, 5)).sum() == 0
    assert encode_rle(np.zeros((4, 5))) == ""


@pytest.mark.parametrize("code, fragment", [
    ("1 2 3", "odd number of tokens"),
    ("1 x", "non-integer token 'x'"),
    ("1.5 2", "non-integer token '1.5'"),
    ("0 2", "start 0 < 1"),
    ("3 0", "length 0 < 1"),
    ("19 3", "past the image"),
    ("1 5 3 2", "overlaps"),
    ("10 2 1 2", "overlaps or precedes"),
])
def test_malformed_code_names_slice_and_class(code, fragment):
    with pytest.raises(RLEError) as err:
        decode_rle(code, (4, 5), where="case1_day2_slice_0003 class stomach")
    assert "case1_day2_slice_0003 class stomach" in str(err.value)
    assert fragment in str(err.value)


def test_adjacent_unmerged_runs_and_single_pixel_runs_decode_like_the_per_run_loop():
    shape = (3, 5)
    for code in ["1 2 3 4", "1 1", "15 1", "1 1 3 1 5 1 15 1", "4 2 6 3 14 2"]:
        expected = np.zeros(15, np.uint8)
        tokens = [int(t) for t in code.split()]
        for start, length in zip(tokens[0::2], tokens[1::2]):
            expected[start - 1:start - 1 + length] = 1
        np.testing.assert_array_equal(decode_rle(code, shape).ravel(), expected, err_msg=code)


def test_run_ending_exactly_at_last_pixel_is_valid():
    assert decode_rle("18 3", (4, 5)).sum() == 3


def test_decode_into_a_given_buffer_and_huge_or_negative_tokens():
    buf = np.zeros(20, np.uint8)
    out = decode_rle("2 3", (4, 5), out=buf)
    assert out.base is buf or out is buf.reshape(4, 5) or np.shares_memory(out, buf)
    assert buf[1:4].tolist() == [1, 1, 1] and buf.sum() == 3
    with pytest.raises(ValueError, match="C-contiguous uint8 array of 4x5"):
        decode_rle("2 3", (4, 5), out=np.zeros((5, 4), np.uint8).T)  # a copy would silently lose the write
    with pytest.raises(RLEError, match="out of range"):
        decode_rle("1 99999999999999999999999", (4, 5))
    with pytest.raises(RLEError, match="start -2 < 1"):
        decode_rle("-2 3", (4, 5))


@pytest.mark.parametrize("code", ["9223372036854775807 5", "1 5 9223372036854775807 5 30 1", "3 1 1 1", "1 25"])
def test_codes_that_could_overflow_or_hide_out_of_order_are_rejected(code):
    with pytest.raises(RLEError):
        decode_rle(code, (4, 5))
