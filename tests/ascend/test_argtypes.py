"""The argparse types shared by ascend.serve and the benchmark scripts (ascend/argtypes.py)."""

import argparse

import pytest

from ascend.argtypes import non_negative, positive, positive_list, positive_seconds


def test_valid_values_parse():
    assert positive("3") == 3 and non_negative("0") == 0 and positive_seconds("2.5") == 2.5
    assert positive_list("1,8,32") == (1, 8, 32) and positive_list("7") == (7,)


@pytest.mark.parametrize("parse, text", [(positive, "0"), (positive, "-1"), (positive, "1.5"), (positive, "x"),
                                         (non_negative, "-1"), (positive_list, "1,0"), (positive_list, "1,,2"),
                                         (positive_list, "a"), (positive_seconds, "inf"), (positive_seconds, "nan"),
                                         (positive_seconds, "0")])
def test_bad_values_are_argparse_errors(parse, text):
    """Refused with argparse's error type (the option is named by argparse, exit 2), the text and what was
    expected in the message."""
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        parse(text)
