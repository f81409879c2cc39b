"""`ascend plan` and `ascend plan show` through the real entry point (errors: one line, exit 2)."""

import json

import numpy as np
import pytest

from ascend.cli import main
from ascend.planner import Plan


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `ascend ARGV`; main() returns normally on success."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_tiny_on_two_cpu_devices_with_tp_ep_and_redundancy(capsys, tmp_path):
    code, out, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--tp", "2",
                         "--ep", "2", "--redundant", "2", "--context", "256", "--batch", "2",
                         "--expert-load", "lognormal:1.0", "--out", str(tmp_path / "plan.json"),
                         "--plot", str(tmp_path / "mem.png"), "--export-eplb", str(tmp_path / "eplb.npz"))
    assert code == 0, err
    assert "winner dp1/tp2/ep2" in out and "8 logical + 2 redundant" in out
    plan = Plan.load(tmp_path / "plan.json")
    assert (plan.tp, plan.ep, plan.redundant) == (2, 2, 2)
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "eplb.npz") as z:
        assert np.array_equal(z["phy2log"], plan.phy2log)
    code, out, _ = run(capsys, "plan", "show", str(tmp_path / "plan.json"), "--layers")
    assert code == 0 and "dp1/tp2/ep2" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == list(range(5))                    # one row per MoE layer
    assert all(float(r[2]) >= float(r[3]) - 1e-4 for r in rows)          # after >= EPLB
    code, out, _ = run(capsys, "plan", "show", str(tmp_path / "plan.json"), "--json")
    assert json.loads(out)["mesh"]["tp"] == 2


def test_plan_json_output(capsys):
    code, out, _ = run(capsys, "plan", "--preset", "flash", "--hardware", "atlas-800-a3", "--json")
    d = json.loads(out)
    assert code == 0 and d["mesh"]["world_size"] == 16 and d["vllm_ascend_args"][:2] == ["vllm", "serve"]
    assert d["candidates"][0]["fits"] and d["candidates"][0]["why"]


@pytest.mark.parametrize("argv,expected", [
    (["--hardware", "nope"], "unknown hardware 'nope'; known:"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--tp", "3"], "no valid layout"),
    (["--preset", "flash", "--hardware", "atlas-800-a2", "--weights", "bf16"], "does not fit"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--expert-load", "lognormal:x"], "lognormal:SIGMA"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--expert-load", "lognormal:-1"], "0 <= SIGMA"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--expert-load", "lognormal:1:2:3"], "0 <= SIGMA"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--expert-load", "zipf:1.1"],
     "'zipf:1.1': no such file"),
    (["--preset", "tiny", "--config", "."], "give one of them"),
    (["--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--ep", "2", "--redundant", "10"],
     "redundant=10: at most 8 with ep=2"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, _, err = run(capsys, "plan", *argv)
    assert code == 2 and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("option", ["--nodes", "--tp", "--ep", "--groups"])
def test_zero_degrees_are_refused_not_taken_as_unset(capsys, option):
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2", option, "0")
    assert code == 2 and f"Invalid value for '{option}': 0 is not in the range x>=1" in err


def test_outputs_are_written_at_exactly_the_paths_given(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--export-eplb",
                       str(tmp_path / "e.bin"), "--plot", str(tmp_path / "mem"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.bin", "mem"]
    assert (tmp_path / "mem").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "e.bin") as z:
        assert z["phy2log"].shape[0] == 5


def test_bad_load_file(capsys, tmp_path):
    np.save(tmp_path / "load.npy", np.ones((2, 8)))
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2",
                       "--expert-load", str(tmp_path / "load.npy"))
    assert code == 2 and "expected [4, 8] or [5, 8]" in err


@pytest.mark.parametrize("option, expected", [("--out", "p.json: cannot write the plan (No such file or directory)"),
                                              ("--plot", "x.png: No such file or directory")])
def test_unwritable_output_is_one_line_exit_2(capsys, tmp_path, option, expected):
    target = tmp_path / "missing" / ("p.json" if option == "--out" else "x.png")
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2", option, str(target))
    assert code == 2 and err == f"error: {tmp_path / 'missing'}/{expected}\n"


def test_export_vllm_keeps_replicas_on_distinct_devices(capsys, tmp_path):
    # vllm-ascend maps (device, expert) -> local slot, so a device may hold each expert once
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "4", "--tp", "1",
                       "--ep", "4", "--redundant", "4", "--expert-load", "lognormal:2.0:3",
                       "--export-vllm", str(tmp_path / "map.json"), "--out", str(tmp_path / "plan.json"))
    assert code == 0, err
    m = json.loads((tmp_path / "map.json").read_text())
    assert m["moe_layer_count"] == 4 and m["layer_list"][0]["device_count"] == 4
    for layer in m["layer_list"]:
        for device in layer["device_list"]:
            assert len(set(device["device_expert"])) == len(device["device_expert"]) == 3
    plan = Plan.load(tmp_path / "plan.json")
    assert np.array_equal(plan.phy2log[:4], [sum((d["device_expert"] for d in layer["device_list"]), [])
                                             for layer in m["layer_list"]])


def test_plot_placement_from_plan_and_from_show(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "--preset", "tiny", "--hardware", "cpu", "--devices", "2", "--tp", "2",
                       "--ep", "2", "--redundant", "2", "--context", "256", "--batch", "2", "--expert-load",
                       "lognormal:1.0", "--out", str(tmp_path / "plan.json"), "--plot-placement", str(tmp_path / "a.png"))
    assert code == 0, err
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 1_000_000
    # the stored rank loads agree with the balancedness make_plan computed on its own
    d = json.loads((tmp_path / "plan.json").read_text())
    for when in ("before", "after"):
        loads = np.array(d["balance"]["rank_load"][when])
        assert loads.shape == (5, 2)
        np.testing.assert_allclose(loads.mean(1) / loads.max(1), d["balance"][when], atol=2e-3)
    code, out, err = run(capsys, "plan", "show", str(tmp_path / "plan.json"), "--plot-placement",
                         str(tmp_path / "b.png"))
    assert code == 0 and "wrote placement plot" in out, err
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a v1 plan written before rank loads were stored still loads and plots (one unit of load per expert)
    del d["balance"]["rank_load"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    code, _, err = run(capsys, "plan", "show", str(tmp_path / "old.json"), "--plot-placement", str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err
