"""Hardware catalogue: every entry resolves, per-die 910C figures, user files, one-line errors."""

import json
import re

import pytest

from ascend.errors import AscendDeployError
from ascend.hardware import HardwareError, get_hardware, hardware_names, load_catalogue

REQUIRED = ["ascend-910b", "ascend-910c", "ascend-950pr", "ascend-950dt", "nvidia-h200", "cpu",
            "atlas-800-a2", "atlas-800-a3", "atlas-900-a3-superpod", "atlas-950-superpod"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_entry_resolves_with_positive_figures(name):
    hw = get_hardware(name)
    assert hw.memory_gib > 0 and hw.memory_gbps > 0 and hw.intra_node_gbps > 0 and hw.inter_node_gbps > 0
    assert hw.tflops and all(v > 0 for v in hw.tflops.values())
    assert "bf16" in hw.native_dtypes or "fp32" in hw.native_dtypes
    assert hw.devices_per_node >= 1


def test_910c_figures_are_per_die():
    # ascend-npu.md section 4: a 910C card has 128 GB, 3.2 TB/s and 752 TFLOPS BF16, and is two dies (ranks)
    die = get_hardware("ascend-910c")
    assert (die.memory_gib, die.memory_gbps, die.tflops["bf16"]) == (128 / 2, 3200 / 2, 752 / 2)
    a3 = get_hardware("atlas-800-a3")
    assert a3.devices_per_node == 16 and a3.device == "ascend-910c"      # 8 cards = 16 dies


def test_system_sizes():
    assert get_hardware("atlas-800-a2").devices_per_node == 8
    pod = get_hardware("atlas-900-a3-superpod")
    assert pod.max_nodes * pod.devices_per_node == 384 * 2                  # 384 NPUs = 768 dies
    big = get_hardware("atlas-950-superpod")
    assert big.max_nodes * big.devices_per_node == 8192
    assert big.memory_gib == 144 and big.memory_gbps == 4000                 # 950DT
    # A2/A3 have no native FP8: FP8 weights compute as BF16; 950 and H200 compute FP8 natively
    assert get_hardware("ascend-910b").compute_dtype("keep") == "bf16"
    assert big.compute_dtype("keep") == "fp8" and get_hardware("nvidia-h200").compute_dtype("int8") == "int8"
    assert get_hardware("atlas-800-a3").limits["dispatch_ep"] == [2, 768]


def test_unknown_name_is_one_line_listing_known_names():
    with pytest.raises(HardwareError) as e:
        get_hardware("ascend-9999")
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, AscendDeployError)
    assert all(n in msg for n in hardware_names())


def test_user_file_adds_hardware(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(
        "devices:\n  my-npu:\n    description: test part\n    soc: A3\n    memory_gib: 32\n    memory_gbps: 800\n"
        "    tflops: {bf16: 100}\n    native_dtypes: [bf16]\n    devices_per_node: 4\n    intra_node_gbps: 50\n"
        "    inter_node_gbps: 10\n    limits: ascend-a2a3\n"
        "systems:\n  my-box:\n    description: 2 x 4\n    device: my-npu\n    devices_per_node: 4\n"
        "    intra_node_gbps: 60\n    inter_node_gbps: 12\n")
    box = get_hardware("my-box", yaml_file)
    assert (box.memory_gib, box.intra_node_gbps, box.limits["indexer_heads_per_rank_max"]) == (32, 60, 64)
    json_file = tmp_path / "mine.json"
    json_file.write_text(json.dumps({"devices": {"x": {**load_catalogue()["devices"]["cpu"], "memory_gib": 1}}}))
    assert get_hardware("x", json_file).memory_gib == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": {"y": {"soc": "cpu"}}}))
    with pytest.raises(HardwareError, match="lacks"):
        get_hardware("y", bad)
    with pytest.raises(HardwareError, match="expected a mapping"):
        (tmp_path / "list.json").write_text("[1]")
        get_hardware("cpu", tmp_path / "list.json")


@pytest.mark.parametrize("change, message", [
    (dict(memory_gbps=0), "memory_gbps = 0.0, expected a positive number"),
    (dict(intra_node_gbps=-5), "intra_node_gbps = -5.0, expected a positive number"),
    (dict(tflops={}), "tflops = {}, expected a mapping"),
    (dict(tflops={"bf16": 0}), "tflops = {'bf16': 0.0}"),
    (dict(native_dtypes="bf16"), "native_dtypes = 'bf16', expected a list"),
    (dict(reserve_gib=-1), "reserve_gib = -1.0, expected in [0, memory_gib"),
    (dict(limits={"dispatch_ep": 5}), "limit dispatch_ep = 5, expected [low, high]"),
    (dict(max_nodes=0), "max_nodes = 0, expected a positive integer"),
])
def test_user_entries_outside_the_cost_models_range_are_refused(tmp_path, change, message):
    """The planner divides by every rate and subtracts the reserve: zero or negative figures gave tracebacks or
    negative communication times."""
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"devices": {"My-NPU": {**load_catalogue()["devices"]["cpu"], **change}}}))
    with pytest.raises(HardwareError, match=re.escape(f"hardware 'My-NPU': {message}")):
        get_hardware("My-NPU", file)


def test_user_file_forms(tmp_path):
    limits_only = tmp_path / "limits.yaml"                 # docs/hardware.md: devices, systems and/or limits
    limits_only.write_text("limits:\n  Mine: {dispatch_topk_max: 8}\n")
    assert "mine" in load_catalogue(limits_only)["limits"]
    named = tmp_path / "named.json"                        # names in any case, references included
    named.write_text(json.dumps({"limits": {"My-Limits": {"dispatch_topk_max": 8}},
                                 "devices": {"My-NPU": {**load_catalogue()["devices"]["cpu"], "limits": "My-Limits"}}}))
    assert get_hardware("my-npu", named).limits == {"dispatch_topk_max": 8}
    broken = tmp_path / "broken.yaml"
    broken.write_text("devices:\n  x: [unclosed\n")
    with pytest.raises(HardwareError) as e:
        get_hardware("x", broken)
    assert "\n" not in str(e.value) and "cannot read hardware file" in str(e.value)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"devices": {"x": 5}}))
    with pytest.raises(HardwareError, match="must be a mapping of name -> entry"):
        get_hardware("x", odd)
