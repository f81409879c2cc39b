"""Backend resolution in every install condition, and the Device surface on CPU.

torch_npu is simulated two ways: by replacing `ascend.device.import_torch_npu` (what the module
returns or raises), and by a real `torch_npu` package on sys.path whose import fails the way the
real wheel does, so the actual import statement is exercised too.
"""

import logging
import re
import sys
import time
import types

import pytest
import torch

import ascend.device as D
from ascend.device import DeviceError, get_device
from tests.conftest import load_script

TORCH = torch.__version__.split("+")[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("ASCEND_DEVICE", "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(D, "_logged", set())


def fake_npu(count=2, soc=223, version="2.14.0"):
    """A module shaped like torch_npu as far as probing reads it."""
    npu = types.SimpleNamespace(device_count=lambda: count, get_soc_version=lambda: soc,
                                get_device_name=lambda i=0: "Ascend910B3", set_device=lambda i: None)
    return types.SimpleNamespace(__version__=version, npu=npu)


def npu_import(monkeypatch, result):
    def _import():
        if isinstance(result, BaseException):
            raise result
        return result
    monkeypatch.setattr(D, "import_torch_npu", _import)


def npu_error(monkeypatch):
    with pytest.raises(DeviceError) as e:
        get_device("npu")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------- npu resolution

def test_torch_npu_not_installed_real_import():
    # this machine really has no torch_npu: the real import path gives the pip hint for our torch
    assert D.probe_npu().reason == f"torch-npu is not installed (pip install torch-npu=={TORCH})"
    with pytest.raises(DeviceError, match=r"^--device npu unavailable: torch-npu is not installed "
                                          r"\(pip install torch-npu==\d+\.\d+\.\d+\)$"):
        get_device("npu")


def test_missing_dependency_of_torch_npu_is_a_broken_install(monkeypatch):
    npu_import(monkeypatch, ModuleNotFoundError("No module named 'decorator'", name="decorator"))
    assert npu_error(monkeypatch) == ("--device npu unavailable: torch-npu is installed but broken: "
                                      "No module named 'decorator'")


@pytest.mark.parametrize("text, lib", [
    ("libascendcl.so: cannot open shared object file: No such file or directory. Please check that the "
     "runtime package is installed. Please run 'source set_env.sh' in the CANN installation path.", "libascendcl.so"),
    ("libhccl.so: cannot open shared object file: No such file or directory. Please check that the cann "
     "package is installed. Please run 'source set_env.sh' in the CANN installation path.", "libhccl.so"),
])
def test_cann_missing(monkeypatch, text, lib):
    npu_import(monkeypatch, ImportError(text))
    assert npu_error(monkeypatch) == (f"--device npu unavailable: CANN libraries not found ({lib} missing); "
                                      f"run `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")


def test_cann_missing_real_import(monkeypatch, tmp_path):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libascendcl.so: cannot open shared object file: No such file or directory. "
        "Please run \\'source set_env.sh\\' in the CANN installation path.')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert D.probe_npu().reason == ("CANN libraries not found (libascendcl.so missing); "
                                    "run `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")


def test_cann_env_incomplete(monkeypatch):
    npu_import(monkeypatch, Exception("ASCEND_OPP_PATH environment variable is not set. Please run "
                                      "'source set_env.sh' in the CANN installation path."))
    assert npu_error(monkeypatch).startswith("--device npu unavailable: CANN environment incomplete (ASCEND_OPP_PATH")
    assert npu_error(monkeypatch).endswith("run `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")


def test_cuda_build_never_imports_torch_npu(monkeypatch):
    npu_import(monkeypatch, AssertionError("torch_npu must not be imported next to CUDA torch"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert npu_error(monkeypatch) == (
        f"--device npu unavailable: torch {torch.__version__} is a cuda 12.8 build; torch-npu needs the CPU "
        f"build of torch (pip install torch=={TORCH} --index-url https://download.pytorch.org/whl/cpu)")


def test_broken_install(monkeypatch):
    npu_import(monkeypatch, RuntimeError("undefined symbol: _ZN3c104cuda\n  in libtorch_npu.so"))
    assert npu_error(monkeypatch) == ("--device npu unavailable: torch-npu is installed but broken: "
                                      "RuntimeError: undefined symbol: _ZN3c104cuda in libtorch_npu.so")


def test_no_visible_npu(monkeypatch):
    npu_import(monkeypatch, fake_npu(count=0))
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    assert npu_error(monkeypatch) == "--device npu unavailable: torch-npu 2.14.0 sees no NPU (ASCEND_RT_VISIBLE_DEVICES=4,5)"
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    assert npu_error(monkeypatch).endswith("(ASCEND_RT_VISIBLE_DEVICES=<unset>)")


def test_driver_error_while_counting(monkeypatch):
    mod = fake_npu()
    mod.npu.device_count = lambda: (_ for _ in ()).throw(RuntimeError("drvGetDevNum failed, error code 87"))
    npu_import(monkeypatch, mod)
    assert npu_error(monkeypatch) == ("--device npu unavailable: torch-npu 2.14.0 cannot query devices: "
                                      "drvGetDevNum failed, error code 87")


def test_operators_only_torch_npu_is_not_a_device(monkeypatch):
    """A torch_npu with operators but no runtime (what ascend.npu_emulation puts in sys.modules)."""
    ops_only = types.ModuleType("torch_npu")
    ops_only.__version__ = "2.14.0+cpu-emulation"
    ops_only.npu_rms_norm = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "torch_npu", ops_only)
    assert D.probe_npu().reason == "torch_npu 2.14.0+cpu-emulation has no device runtime (torch_npu.npu missing)"
    assert get_device().type == "cpu"


def test_cuda_unavailable_messages(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)      # a CPU build of torch (also where a GPU runs the suite)
    with pytest.raises(DeviceError, match=rf"^--device cuda unavailable: torch {re.escape(torch.__version__)} is not a CUDA build$"):
        get_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"^--device cuda unavailable: no CUDA device visible \(CUDA_VISIBLE_DEVICES=\)$"):
        get_device("cuda")


# -------------------------------------------------------------------------- auto / explicit

@pytest.mark.parametrize("soc, family, fp8", [(220, "A2", False), (225, "A2", False), (250, "A3", False),
                                              (255, "A3", False), (260, "A5", True), (202, "310P", False)])
def test_auto_picks_npu(monkeypatch, soc, family, fp8):
    npu_import(monkeypatch, fake_npu(count=8, soc=soc))
    d = get_device()
    assert (d.type, d.count, d.collective_backend, d.soc) == ("npu", 8, "hccl", family)
    assert d.index == 0  # torch.device("npu") itself exists only once real torch_npu registers it
    assert (torch.float8_e4m3fn in d.native_dtypes) == fp8
    assert (torch.bfloat16 in d.native_dtypes) == (family != "310P")
    assert d.reason == "8 device(s) found"


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    npu_import(monkeypatch, ImportError("libhccl.so: cannot open shared object file"))
    with caplog.at_level(logging.INFO, logger="ascend.device"):
        for _ in range(3):
            d = get_device()
    assert d.type == "cpu" and d.collective_backend == "gloo"
    assert d.reason.startswith("no accelerator (npu: CANN libraries not found (libhccl.so missing)")
    assert "cuda: torch" in d.reason
    assert [r.getMessage() for r in caplog.records] == [f"using cpu: {d.reason}"]


def test_explicit_and_env_request(monkeypatch):
    npu_import(monkeypatch, fake_npu())
    assert get_device("cpu").type == "cpu"  # explicit cpu wins over an available NPU
    monkeypatch.setenv("ASCEND_DEVICE", "cpu")
    assert get_device().type == "cpu" and get_device(None).reason == "requested"
    monkeypatch.setenv("ASCEND_DEVICE", "npu")
    assert get_device().type == "npu"
    monkeypatch.setenv("ASCEND_DEVICE", "tpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        get_device()


def test_set_device_out_of_range(monkeypatch):
    npu_import(monkeypatch, fake_npu(count=2))
    d = get_device("npu")
    d.set_device(1)
    assert d.index == 1
    with pytest.raises(DeviceError, match="local rank 2 has no npu device"):
        d.set_device(2)


def test_soc_and_gpu_dtype_tables():
    assert [D.soc_family(v) for v in (219, 220, 224, 250, 253, 200, 205, 260, 261)] == \
        ["soc219", "A2", "A2", "A3", "A3", "310P", "310P", "A5", "soc261"]
    h200 = D.cuda_dtypes((9, 0))
    assert h200 == (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)
    assert torch.float8_e4m3fn not in D.cuda_dtypes((8, 0))
    assert torch.float4_e2m1fn_x2 in D.cuda_dtypes((10, 0))
    assert torch.float4_e2m1fn_x2 in D.NPU_DTYPES["A5"]


# ------------------------------------------------------------------------------ CPU surface

def test_cpu_surface():
    d = get_device("cpu")
    assert (d.type, d.count, d.soc, d.collective_backend) == ("cpu", 1, "cpu", "gloo")
    assert d.native_dtypes == (torch.float32, torch.bfloat16)
    d.set_device(3)  # every local rank shares the host
    assert d.torch_device == d.torch_device_at(5) == torch.device("cpu")
    s = d.stream()
    with d.use_stream(s):
        start, end = d.event(), d.event()
        start.record()
        time.sleep(0.02)
        end.record(s)
    s.synchronize()
    d.synchronize()
    assert d.current_stream().query() and end.query()
    assert end.elapsed_time(start) < 0 < 20 <= start.elapsed_time(end)
    with pytest.raises(RuntimeError, match="both events recorded"):
        d.event().elapsed_time(end)


def test_use_stream_names_the_lane_of_the_work_inside():
    """`stream_lane()`: the stream of the innermost `use_stream`, the caller's own (None) outside and again after."""
    from ascend.device import stream_lane
    d = get_device("cpu")
    a, b = d.stream(), d.stream()
    assert stream_lane() is None
    with d.use_stream(a) as entered:
        assert entered is a and stream_lane() is a
        with d.use_stream(b):
            assert stream_lane() is b
        assert stream_lane() is a
    assert stream_lane() is None


def test_cpu_memory_tracks_rss():
    d = get_device("cpu")
    before = d.memory()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    grown = d.memory()
    assert grown.allocated - before.allocated >= 0.9 * x.numel() * 4
    assert grown.peak >= grown.allocated and 0 < grown.free < grown.total
    del x
    d.reset_peak()
    after = d.memory()
    assert after.peak < grown.peak - 32 * 2**20  # the high-water mark was really reset
    d.empty_cache()


def test_cpu_graph_replays_like_eager():
    d = get_device("cpu")
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    g = d.graph()
    with pytest.raises(RuntimeError, match="before capture"):
        g.replay()
    y, z = g.capture(lambda a: (a @ w, a.sum(0)), x, pool=d.graph_pool())
    for _ in range(3):
        x.copy_(torch.randn(4, 8))  # new inputs go into the captured input tensor
        g.replay()
        torch.testing.assert_close(y, x @ w)
        torch.testing.assert_close(z, x.sum(0))


def test_check_device_script_passes_on_cpu():
    """scripts/check_device.py (run on the H200 by the integrator) must pass here in --quick mode."""
    script = load_script("check_device")
    results = script.run_checks(get_device("cpu"), quick=True)
    assert sorted(results) == ["events", "graph", "memory", "streams", "synchronize"]
    assert all(r["ok"] for r in results.values()), results
    # a check that raises is reported as failed, and the others still run
    failed = script.run_checks(types.SimpleNamespace(type="cpu"), quick=True)
    assert not any(r["ok"] for r in failed.values()) and "AttributeError" in failed["graph"]["detail"]
