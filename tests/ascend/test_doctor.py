"""`ascend doctor`: JSON fields, table, CANN version discovery, and the exit-2 one-line error."""

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from click.testing import CliRunner

import ascend.device as D
from ascend.cli import cli, main
from ascend.doctor import cann_version

TORCH = torch.__version__.split("+")[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ASCEND_", "HCCL_", "CUDA_VISIBLE")):
            monkeypatch.delenv(k)


def doctor_json(*args, env=None) -> dict:
    result = CliRunner().invoke(cli, ["doctor", "--json", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_on_cpu():
    r = doctor_json(env={"HCCL_BUFFSIZE": "200", "ASCEND_RT_VISIBLE_DEVICES": "0,1", "UNRELATED": "x"})
    assert (r["backend"], r["requested"], r["soc"], r["collective_backend"]) == ("cpu", "auto", "cpu", "gloo")
    assert r["native_dtypes"] == ["float32", "bfloat16"]
    assert r["backends"]["npu"] == {"available": False, "devices": 0,
                                    "reason": f"torch-npu is not installed (pip install torch-npu=={TORCH})"}
    assert r["backends"]["cpu"]["available"] and not r["backends"]["cuda"]["available"]
    assert r["reason"].startswith("no accelerator (npu: torch-npu is not installed")
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["torch_npu"] is None
    assert r["versions"]["cann"] is None
    assert r["env"] == {"ASCEND_RT_VISIBLE_DEVICES": "0,1", "HCCL_BUFFSIZE": "200"}
    [dev] = r["devices"]
    assert 0 < dev["memory_free_bytes"] <= dev["memory_total_bytes"]


def test_json_on_a_simulated_a3_node(monkeypatch):
    npu = types.SimpleNamespace(device_count=lambda: 2, get_soc_version=lambda: 253,
                                get_device_name=lambda i=0: f"Ascend910_9382 #{i}",
                                mem_get_info=lambda i=0: (60 * 2**30 + i, 64 * 2**30))
    monkeypatch.setattr(D, "import_torch_npu", lambda: types.SimpleNamespace(__version__="2.14.0", npu=npu))
    r = doctor_json()
    assert (r["backend"], r["soc"], r["collective_backend"]) == ("npu", "A3", "hccl")
    assert r["native_dtypes"] == ["bfloat16", "float16", "int8"]
    assert r["reason"] == "2 device(s) found"
    assert [(d["name"], d["memory_free_bytes"]) for d in r["devices"]] == \
        [("Ascend910_9382 #0", 60 * 2**30), ("Ascend910_9382 #1", 60 * 2**30 + 1)]
    table = CliRunner().invoke(cli, ["doctor"]).output
    assert "device 1            Ascend910_9382 #1: 60.0 GiB free of 64.0 GiB" in table


def test_table_on_cpu():
    out = CliRunner().invoke(cli, ["doctor", "--device", "cpu"]).output
    rows = dict(re.match(r"^(\S.*?)\s{2,}(.*)$", line).groups() for line in out.splitlines() if line[0] != " ")
    assert rows["backend"] == "cpu (requested)"
    assert (rows["soc"], rows["collective backend"], rows["native dtypes"]) == ("cpu", "gloo", "float32, bfloat16")
    assert rows["torch-npu"] == "not installed" and rows["torch"] == torch.__version__
    assert rows["CANN"].startswith("not found")


def test_cann_version_from_install_info(tmp_path):
    arch = tmp_path / "x86_64-linux"
    arch.mkdir()
    (arch / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=8.1.RC1\n")
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == (str(tmp_path), "8.1.RC1")
    r = doctor_json(env={"ASCEND_TOOLKIT_HOME": str(tmp_path)})
    assert (r["versions"]["cann"], r["versions"]["cann_toolkit"]) == ("8.1.RC1", str(tmp_path))


def test_cann_version_fallbacks(tmp_path):
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "version.info").write_text("Version=7.0.0\n")
    assert cann_version({"ASCEND_HOME_PATH": str(tmp_path)}) == (str(tmp_path), "7.0.0")
    (tmp_path / "compiler" / "version.info").write_text("no version here\n")
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == (str(tmp_path), None)
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path / "absent")}) == (None, None)


def test_explicit_npu_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--device", "npu"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: --device npu unavailable: torch-npu is not installed (pip install torch-npu=={TORCH})\n"


def broken_torch_npu(path):
    """A torch_npu package that raises at import, as one built for another CANN does."""
    (path / "torch_npu").mkdir()
    (path / "torch_npu" / "__init__.py").write_text("raise RuntimeError('acl init failed: 507008')\n")
    return str(path)


BROKEN = "torch-npu is installed but broken: RuntimeError: acl init failed: 507008"


def test_broken_torch_npu_does_not_break_import_or_doctor(tmp_path):
    """In a fresh interpreter with a broken torch_npu first on the path, `ascend doctor` still runs, on CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_")}
    env["PYTHONPATH"] = os.pathsep.join([broken_torch_npu(tmp_path), env.get("PYTHONPATH", "")])
    ok = subprocess.run([sys.executable, "-m", "ascend.cli", "doctor", "--json"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    r = json.loads(ok.stdout)
    assert r["backend"] == "cpu" and r["backends"]["npu"]["reason"] == BROKEN


def test_broken_torch_npu_explicit_request_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(broken_torch_npu(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--device", "npu", "--json"])
    captured = capsys.readouterr()
    assert (e.value.code, captured.out) == (2, "")
    assert captured.err == f"error: --device npu unavailable: {BROKEN}\n"
