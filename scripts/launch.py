#!/usr/bin/env python3
"""Serve DeepSeek-V4 on one rank of a torchrun job, from a source checkout (the code is ascend/serve.py, which
`ascend run` starts as `torchrun ... -m ascend.serve`):

    torchrun --nproc-per-node 2 scripts/launch.py --ckpt OUT --input prompts.jsonl [--json]
"""

from ascend.serve import main

if __name__ == "__main__":
    main()
