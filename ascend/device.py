"""One `Device` for Ascend NPU, CUDA GPU and CPU: which backend, why, and a common surface over it.

`get_device("auto")` picks npu when torch_npu imports and reports devices, else cuda, else cpu, and
logs the fallback reason once. torch_npu is imported lazily and inside try/except: importing it
fails on a CUDA build of torch, raises ImportError without the CANN libraries, and a broken install
can raise anything, none of which may break `import ascend`. Asking explicitly for a backend that is
not usable raises `DeviceError` with one line saying why and what to do.

The surface (streams, events, memory, graph capture, collective backend, SoC family, native dtypes)
is the torch.cuda API, which torch.npu mirrors; on CPU each piece has a plain equivalent so code
written for an accelerator also runs here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import resource
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from ascend.errors import AscendDeployError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "npu", "cuda", "cpu")
CANN_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


class DeviceError(AscendDeployError):
    """The requested backend cannot be used here (message says why and what to do)."""


# ----------------------------------------------------------------------------------- probing

def import_torch_npu() -> ModuleType:
    """The only place torch_npu is imported (tests replace this function to simulate installs)."""
    import torch_npu

    return torch_npu


def torch_build() -> str:
    """'cuda 12.8' / 'rocm 6.2' for an accelerator build of torch, '' for the CPU build."""
    if torch.version.cuda:
        return f"cuda {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"rocm {torch.version.hip}"
    return ""


@dataclass(frozen=True)
class Probe:
    """Whether one backend is usable: `count` devices, or `reason` (one line) why not."""
    backend: str
    count: int
    reason: str = ""
    runtime: Any = None  # torch.npu / torch.cuda module when usable

    @property
    def ok(self) -> bool:
        return self.count > 0


def _torch_release() -> str:
    return torch.__version__.split("+")[0]


def probe_npu() -> Probe:
    """Try torch_npu and classify every way it can fail."""
    build = torch_build()
    if build:  # torch_npu refuses to load next to another accelerator, so do not even try
        return Probe("npu", 0, f"torch {torch.__version__} is a {build} build; torch-npu needs the CPU build "
                               f"of torch (pip install torch=={_torch_release()} --index-url "
                               f"https://download.pytorch.org/whl/cpu)")
    try:
        torch_npu = import_torch_npu()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torch_npu":  # a dependency of torch_npu is missing
            return Probe("npu", 0, f"torch-npu is installed but broken: {_one_line(e)}")
        return Probe("npu", 0, f"torch-npu is not installed (pip install torch-npu=={_torch_release()})")
    except ImportError as e:
        text = str(e)
        if any(k in text for k in ("libascendcl", "libhccl", "set_env.sh", "libascend_hal", "libruntime")):
            return Probe("npu", 0, f"CANN libraries not found ({_missing_lib(text)}); run `{CANN_HINT}`")
        return Probe("npu", 0, f"torch-npu is installed but broken: {_one_line(e)}")
    except Exception as e:  # noqa: BLE001 -- a broken install may raise anything at import
        text = str(e)
        if "Two accelerators" in text:
            return Probe("npu", 0, f"torch {torch.__version__} is an accelerator build; torch-npu needs the CPU build")
        if "set_env.sh" in text:
            return Probe("npu", 0, f"CANN environment incomplete ({_one_line(e)}); run `{CANN_HINT}`")
        return Probe("npu", 0, f"torch-npu is installed but broken: {type(e).__name__}: {_one_line(e)}")
    runtime = getattr(torch_npu, "npu", None)
    if runtime is None:  # e.g. ascend.npu_emulation's operators-only stand-in
        return Probe("npu", 0, f"torch_npu {_version(torch_npu)} has no device runtime (torch_npu.npu missing)")
    try:
        count = runtime.device_count()
    except Exception as e:  # noqa: BLE001 -- driver errors surface here
        return Probe("npu", 0, f"torch-npu {_version(torch_npu)} cannot query devices: {_one_line(e)}")
    if count == 0:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return Probe("npu", 0, f"torch-npu {_version(torch_npu)} sees no NPU "
                               f"(ASCEND_RT_VISIBLE_DEVICES={visible if visible is not None else '<unset>'})")
    return Probe("npu", count, runtime=runtime)


def probe_cuda() -> Probe:
    if not torch.version.cuda:
        return Probe("cuda", 0, f"torch {torch.__version__} is not a CUDA build")
    try:
        count = torch.cuda.device_count()
    except Exception as e:  # noqa: BLE001
        return Probe("cuda", 0, f"CUDA runtime error: {_one_line(e)}")
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return Probe("cuda", 0, f"no CUDA device visible "
                                f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset>'})")
    return Probe("cuda", count, runtime=torch.cuda)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _missing_lib(text: str) -> str:
    m = re.search(r"lib[\w.+-]+\.so[\w.]*", text)
    return f"{m.group(0)} missing" if m else _one_line(ImportError(text))


def _version(module: ModuleType) -> str:
    return getattr(module, "__version__", "?")


# ------------------------------------------------------------------------------ hardware facts

def soc_family(soc_version: int) -> str:
    """Ascend family from `torch.npu.get_soc_version()` (ascend-npu.md §1)."""
    for lo, hi, family in ((220, 225, "A2"), (250, 255, "A3"), (200, 205, "310P"), (260, 260, "A5")):
        if lo <= soc_version <= hi:
            return family
    return f"soc{soc_version}"


def _dtypes(*names: str) -> tuple[torch.dtype, ...]:
    """Torch dtypes by name, skipping those this torch does not have (fp4 needs torch >= 2.8)."""
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


# Formats the hardware computes natively; the converter and planner pick weight formats from this.
NPU_DTYPES = {
    "A2": _dtypes("bfloat16", "float16", "int8"),  # no FP8 on 910B/910C: FP8 checkpoints become BF16/W8A8
    "A3": _dtypes("bfloat16", "float16", "int8"),
    "A5": _dtypes("bfloat16", "float16", "float8_e4m3fn", "float4_e2m1fn_x2", "int8"),  # 950: + FP8, MXFP4
    "310P": _dtypes("float16", "int8"),
}
CPU_DTYPES = _dtypes("float32", "bfloat16")


def cuda_dtypes(capability: tuple[int, int]) -> tuple[torch.dtype, ...]:
    """By compute capability: FP8 tensor cores from sm89 (Ada/Hopper), FP4 from sm100 (Blackwell)."""
    names = ["float16", "int8"]
    if capability >= (8, 0):
        names.insert(0, "bfloat16")
    if capability >= (8, 9):
        names.insert(2, "float8_e4m3fn")
    if capability >= (10, 0):
        names.insert(3, "float4_e2m1fn_x2")
    return _dtypes(*names)


# ------------------------------------------------------------------------------ common surface

@dataclass(frozen=True)
class MemoryInfo:
    """Bytes. On an accelerator: the caching allocator's tensors and the device's free/total.
    On CPU: the process's resident set (current and high-water mark) and the host's available/total."""
    allocated: int
    peak: int
    free: int
    total: int


_LANE: contextvars.ContextVar = contextvars.ContextVar("ascend_stream_lane", default=None)


def stream_lane() -> Any:
    """The side stream the innermost `Device.use_stream` put this work on; None on the caller's own stream. Kernels
    that keep state between launches in device buffers (the split-K arrival tickets of `ascend.backends.
    triton_common`) keep a buffer per lane: work on two lanes may run at once, and launches sharing counters would
    count each other's arrivals (on an H200, two streams of split-K projections at once: 9 wrong sums of 2,000 with
    one buffer, none with one per stream; docs/performance.md). A lane, not the current stream: a branch's side
    stream is the same object when it is warmed up eagerly and when it is captured, where the main path moves from
    the warm-up stream to the capture stream, and a buffer first needed inside a capture cannot serve eager calls."""
    return _LANE.get()


@contextlib.contextmanager
def _in_lane(stream: Any):
    token = _LANE.set(stream)
    try:
        yield
    finally:
        _LANE.reset(token)


class Graph:
    """Capture `fn(*args)` once, then `replay()` it; outputs are static tensors updated in place.

    Inputs are static too: copy new values into the captured input tensors before `replay()`.
    """

    def __init__(self, device: Device):
        self.device = device
        self._graph = None
        self._outputs = None

    def capture(self, fn: Callable[..., Any], *args: Any, warmup: int = 2, pool: Any = None) -> Any:
        """Run `fn(*args)` `warmup` times eagerly, then capture it; `pool` (from `Device.graph_pool()`)
        lets graphs that never replay concurrently, such as one per decode batch size, share memory."""
        rt = self.device.runtime
        side = rt.Stream()  # warm up on a side stream so lazy allocations happen outside capture
        side.wait_stream(rt.current_stream())
        with rt.stream(side):
            for _ in range(warmup):
                fn(*args)
        rt.current_stream().wait_stream(side)
        self._graph = self.device.graph_class()
        with rt.graph(self._graph, pool=pool):
            self._outputs = fn(*args)
        return self._outputs

    def replay(self) -> None:
        if self._graph is None:
            raise RuntimeError("Graph.replay() before capture()")
        self._graph.replay()


class EagerGraph(Graph):
    """CPU stand-in: replay re-runs the function eagerly and writes into the captured outputs."""

    def capture(self, fn: Callable[..., Any], *args: Any, warmup: int = 0, pool: Any = None) -> Any:
        self._fn, self._args = fn, args
        self._outputs = fn(*args)
        self._graph = self
        return self._outputs

    def replay(self) -> None:
        if self._graph is None:
            raise RuntimeError("Graph.replay() before capture()")
        fresh, _ = tree_flatten(self._fn(*self._args))
        static, _ = tree_flatten(self._outputs)
        for out, new in zip(static, fresh):
            if isinstance(out, torch.Tensor):
                out.copy_(new)


class CpuStream:
    """CPU work is synchronous, so a stream only needs to accept the calls made on real streams."""

    def synchronize(self) -> None: ...
    def wait_stream(self, other: CpuStream) -> None: ...
    def wait_event(self, event: CpuEvent) -> None: ...
    def query(self) -> bool:
        return True

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record()
        return event


class CpuEvent:
    """Wall-clock event (time.perf_counter at record); elapsed_time in milliseconds like CUDA's."""

    def __init__(self, enable_timing: bool = True):
        self.t: float | None = None

    def record(self, stream: CpuStream | None = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return self.t is not None

    def elapsed_time(self, end: CpuEvent) -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("elapsed_time() needs both events recorded")
        return (end.t - self.t) * 1e3


class Device:
    """An accelerator (npu or cuda) driven through its torch runtime module (torch.npu mirrors torch.cuda)."""

    def __init__(self, type: str, count: int, reason: str, runtime: Any = None):
        self.type = type
        self.count = count
        self.reason = reason  # why this backend was chosen (with the fallbacks taken)
        self.runtime = runtime
        self.index = 0

    def __repr__(self) -> str:
        return f"Device({self.type}:{self.index}, count={self.count}, soc={self.soc!r})"

    # placement
    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index)

    def torch_device_at(self, index: int) -> torch.device:
        return torch.device(self.type, index)

    def set_device(self, local_rank: int) -> None:
        if not 0 <= local_rank < self.count:
            raise DeviceError(f"local rank {local_rank} has no {self.type} device (only {self.count} visible)")
        self.runtime.set_device(local_rank)
        self.index = local_rank

    def synchronize(self) -> None:
        self.runtime.synchronize(self.index)

    # streams and events
    def stream(self) -> Any:
        """A side stream. CUDA's (and torch_npu's) come from a pool that repeats (torch: 32 per priority, round
        robin), so two calls can return the same stream, and one can be the stream a graph is captured on."""
        return self.runtime.Stream(device=self.torch_device)

    def current_stream(self) -> Any:
        return self.runtime.current_stream(self.index)

    @contextlib.contextmanager
    def use_stream(self, stream: Any):
        """Run the block's work on `stream`, which is also its lane (`stream_lane`)."""
        with self.runtime.stream(stream), _in_lane(stream):
            yield stream

    def event(self, enable_timing: bool = True) -> Any:
        return self.runtime.Event(enable_timing=enable_timing)

    # memory
    def memory(self) -> MemoryInfo:
        free, total = self.runtime.mem_get_info(self.index)
        return MemoryInfo(self.runtime.memory_allocated(self.index), self.runtime.max_memory_allocated(self.index),
                          free, total)

    def reset_peak(self) -> None:
        self.runtime.init()      # the allocator's statistics exist once the runtime is up ("invalid device" before)
        self.runtime.reset_peak_memory_stats(self.index)

    def empty_cache(self) -> None:
        self.runtime.empty_cache()

    # graphs
    def graph(self) -> Graph:
        return Graph(self)

    @property
    def graph_class(self) -> type:
        return self.runtime.NPUGraph if self.type == "npu" else self.runtime.CUDAGraph

    def graph_pool(self) -> Any:
        """A memory-pool token for `Graph.capture(pool=...)`."""
        return self.runtime.graph_pool_handle()

    # facts
    @property
    def collective_backend(self) -> str:
        return {"npu": "hccl", "cuda": "nccl"}[self.type]

    @functools.cached_property
    def name(self) -> str:
        return self.runtime.get_device_name(self.index)

    @functools.cached_property
    def soc(self) -> str:
        if self.type == "npu":
            return soc_family(int(self.runtime.get_soc_version()))
        return self.name

    @functools.cached_property
    def native_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.type == "npu":
            return NPU_DTYPES.get(self.soc, _dtypes("float16", "int8"))
        return cuda_dtypes(tuple(self.runtime.get_device_capability(self.index)))


class CpuDevice(Device):
    """The host: synchronous streams, wall-clock events, process RSS as memory, eager 'graphs'."""

    def __init__(self, reason: str):
        super().__init__("cpu", 1, reason)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def torch_device_at(self, index: int) -> torch.device:
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        """Every local rank shares the host."""

    def synchronize(self) -> None:
        """CPU ops have finished when they return."""

    def stream(self) -> CpuStream:
        return CpuStream()

    current_stream = stream

    @contextlib.contextmanager
    def use_stream(self, stream: CpuStream):
        with _in_lane(stream):          # nothing runs concurrently here, but kernels key their state by lane alike
            yield stream

    def event(self, enable_timing: bool = True) -> CpuEvent:
        return CpuEvent(enable_timing)

    def memory(self) -> MemoryInfo:
        status = _proc_kib("/proc/self/status", ("VmRSS", "VmHWM"))
        meminfo = _proc_kib("/proc/meminfo", ("MemAvailable", "MemTotal"))
        # Without /proc (not Linux) fall back to getrusage's high-water mark for both.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total = meminfo.get("MemTotal", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return MemoryInfo(status.get("VmRSS", maxrss), status.get("VmHWM", maxrss),
                          meminfo.get("MemAvailable", 0), total)

    def reset_peak(self) -> None:
        """Linux resets the RSS high-water mark (VmHWM) when "5" is written to /proc/self/clear_refs."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            log.debug("cannot reset peak RSS here; peak stays the process-lifetime high-water mark")

    def empty_cache(self) -> None:
        """The CPU allocator returns memory to the OS itself."""

    def graph(self) -> Graph:
        return EagerGraph(self)

    def graph_pool(self) -> None:
        return None

    @property
    def collective_backend(self) -> str:
        return "gloo"

    name = soc = "cpu"
    native_dtypes = CPU_DTYPES


def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """'Key:  123 kB' lines of a /proc file, in bytes."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class Resolution:
    """The backend chosen for a request, why, and why each better backend was skipped."""
    requested: str
    chosen: str
    probes: tuple[Probe, ...]

    @property
    def skipped(self) -> list[Probe]:
        return [p for p in self.probes if not p.ok]


def resolve(name: str | None = None) -> Resolution:
    """Probe backends for `name` (None: $ASCEND_DEVICE or auto); raise DeviceError if an explicit one is unusable."""
    requested = (name or os.environ.get("ASCEND_DEVICE") or "auto").lower()
    if requested not in BACKENDS:
        raise DeviceError(f"unknown device {requested!r} (from --device or ASCEND_DEVICE); expected one of "
                          f"{', '.join(BACKENDS)}")
    if requested == "cpu":
        return Resolution("cpu", "cpu", ())
    if requested in ("npu", "cuda"):
        probe = probe_npu() if requested == "npu" else probe_cuda()
        if not probe.ok:
            raise DeviceError(f"--device {requested} unavailable: {probe.reason}")
        return Resolution(requested, requested, (probe,))
    probes = []
    for probe_fn in (probe_npu, probe_cuda):
        probes.append(probe_fn())
        if probes[-1].ok:
            return Resolution("auto", probes[-1].backend, tuple(probes))
    return Resolution("auto", "cpu", tuple(probes))


_logged: set[tuple[str, ...]] = set()


def get_device(name: str | None = None) -> Device:
    """The Device for `name` in auto|npu|cuda|cpu (None: $ASCEND_DEVICE, else auto)."""
    res = resolve(name)
    skipped = "; ".join(f"{p.backend}: {p.reason}" for p in res.skipped)
    if res.chosen == "cpu":
        reason = "requested" if res.requested == "cpu" else f"no accelerator ({skipped})"
        device: Device = CpuDevice(reason)
    else:
        probe = res.probes[-1]
        reason = "requested" if res.requested != "auto" else (
            f"{probe.count} device(s) found" + (f" (skipped {skipped})" if skipped else ""))
        device = Device(probe.backend, probe.count, reason, probe.runtime)
    if res.skipped and (key := tuple(p.reason for p in res.skipped)) not in _logged:
        _logged.add(key)  # say once per process why we fell back, not on every get_device()
        log.info("using %s: %s", device.type, reason)
    return device
