"""ascend/serve.py's options: sizes and timeouts must be positive (refused by argparse, exit 2, naming the option)."""

import pytest

from ascend.serve import parse_args


@pytest.mark.parametrize("option, value", [("--max-new-tokens", "-1"), ("--max-len", "0"), ("--max-batch", "0"),
                                           ("--prefill-chunk", "-8"), ("--dist-timeout", "0")])
def test_non_positive_sizes_are_refused(capsys, option, value):
    with pytest.raises(SystemExit) as e:
        parse_args(["--ckpt", "x", option, value])
    assert e.value.code == 2 and f"argument {option}: {value}: expected a positive number" in capsys.readouterr().err


def test_defaults_pass():
    args = parse_args(["--ckpt", "x", "--max-new-tokens", "3", "--dist-timeout", "0.5"])
    assert (args.max_new_tokens, args.max_len, args.dist_timeout) == (3, 4096, 0.5)
