"""ascend/serve.py's options: out-of-range sizes, sampling values and paths are refused by argparse (exit 2, naming
the option), before any rank loads a weight."""

import pytest

from ascend.serve import parse_args


@pytest.mark.parametrize("option, value, expected", [
    ("--max-new-tokens", "-1", "a positive integer"), ("--max-len", "1.5", "a positive integer"),
    ("--max-batch", "0", "a positive integer"), ("--prefill-chunk", "-8", "a positive integer"),
    ("--dist-timeout", "0", "a positive number of seconds"), ("--dist-timeout", "inf", "a positive number of"),
    ("--temperature", "nan", "a finite number"), ("--top-p", "0", "a number in (0, 1]"),
    ("--top-p", "1.5", "a number in (0, 1]"), ("--top-k", "-3", "an integer >= 0"),
    ("--save", "/no/such/dir/x.json", "a file path in an existing"),
])
def test_out_of_range_options_are_refused(capsys, option, value, expected):
    with pytest.raises(SystemExit) as e:
        parse_args(["--ckpt", "x", option, value])
    assert e.value.code == 2 and f"argument {option}: {value}: expected {expected}" in capsys.readouterr().err


def test_defaults_pass():
    args = parse_args(["--ckpt", "x", "--max-new-tokens", "3", "--dist-timeout", "0.5"])
    assert (args.max_new_tokens, args.max_len, args.dist_timeout) == (3, 4096, 0.5)
