"""ascend-deploy: DeepSeek-V4 on Huawei Ascend NPUs, with CUDA and CPU fallbacks.

`ascend` holds what depends on the machine: the device layer, the distributed mesh, the hardware
catalogue, the planner, the operator backends and the CLI. The model lives in `model`, checkpoint
I/O in `convert`.
"""

from ascend.errors import AscendDeployError

__all__ = ["AscendDeployError"]
__version__ = "0.1.0"
