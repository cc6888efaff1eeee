"""bench/heads.py, the toolbox heads before and after fastctx.swap: the report's shape, on tiny
sizes (no timing assertions).

The CLI test builds real mmseg and sssegmentation heads (tests/toolboxes.py; FAILS when a toolbox
is missing, as the other toolbox tests do). The others use a toolbox-free stand-in head: a head
whose swap replaces nothing is reported "skipped: nothing swapped" and never timed, and a swapped
head whose logits differ fails its parity check loudly (exit status 1).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys

import pytest
import torch
from torch import nn

from fastctx.swap import SwapEntry, SwapReport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--size", "1x9x17", "--narrow", "16"]  # in_channels 128, channels 32, ...


@pytest.fixture(scope="module")
def heads():
    spec = importlib.util.spec_from_file_location("bench_heads", os.path.join(ROOT, "bench", "heads.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_heads"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_heads", None)


@pytest.fixture
def one_thread():
    """One intra-op thread: the cases are tiny, and idle threads spin on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows_of(report: dict, case: str, cand: str) -> dict:
    return {r["mode"]: r for r in report["rows"] if r["case"] == case and r["candidate"] == cand}


def test_quick_report_of_toolbox_heads(heads, tmp_path, one_thread):
    assert heads.main([*TINY, "--heads", "mmseg-CCHead,ssseg-ISNet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    csv = (tmp_path / "report.csv").read_text()
    cc, isnet = "mmseg-CCHead-B1-9x17-width/16", "ssseg-ISNet-B1-9x17-width/16"
    # CCHead: both candidates timed side by side, ratios against the original, parity verdict
    orig, fast = rows_of(report, cc, "original"), rows_of(report, cc, "swapped")
    assert set(orig) == set(fast) == {"fwd", "bwd", "fwd+bwd"}
    for mode in ("fwd", "fwd+bwd"):
        assert fast[mode]["status"] == "ok" and fast[mode]["out_rel_err"] < 1e-4
        assert fast[mode]["speedup_vs_reference"] > 0 and fast[mode]["memory_vs_reference"] is not None
        assert orig[mode]["speedup_vs_reference"] == 1.0
    config = fast["fwd"]["config"]
    assert config["swapped"] == [
        "model.cca: mmcv.ops.cc_attention.CrissCrossAttention -> fastctx.nn.criss_cross.CrissCrossAttention"]
    assert config["B"] == 1 and (config["in_channels"], config["channels"]) == (128, 32)
    targets = [t for t in report["targets"] if t["case"] == cc]
    assert len(targets) == 4 and {t["result"] for t in targets} <= {"pass", "miss"}
    # ISNet: swapped when this fastctx recognises its modules, else skipped and never timed
    isnet_fast = rows_of(report, isnet, "swapped")
    assert set(rows_of(report, isnet, "original")) == {"fwd", "bwd", "fwd+bwd"}
    if next(iter(isnet_fast.values()))["config"]["swapped"]:
        assert isnet_fast["fwd+bwd"]["status"] == "ok"
    else:
        assert list(isnet_fast) == ["-"] and isnet_fast["-"]["status"].startswith("skipped: nothing swapped")
        assert isnet_fast["-"]["median_ms"] is None
        assert {t["result"] for t in report["targets"] if t["case"] == isnet} == {"not measured"}
    assert any("at least 10x as fast" in t["target"] for t in report["targets"] if t["case"] == isnet)
    # the Markdown: the candidates' table with ratios, the targets and the parity verdicts
    assert f"## heads {cc} fp32" in md and "| x ref (fwd+bwd) |" in md and "## Targets" in md
    assert f"| {cc} | swapped | **ok** |" in md and f"| {cc} | original | **ok** |" in md
    assert csv.count(",original,") >= 9 and csv.count(",swapped,") >= 6
    # the replaced modules alone: CCHead calls its criss-cross module twice (recurrence 2), each
    # call replayed on the input the original head gave it; both candidates checked and timed
    parts = cc + "-swapped-modules"
    orig, fast = rows_of(report, parts, "original"), rows_of(report, parts, "swapped")
    assert set(orig) == set(fast) == {"fwd", "bwd", "fwd+bwd"}
    assert fast["fwd+bwd"]["status"] == "ok" and fast["fwd+bwd"]["out_rel_err"] < 1e-5
    assert fast["fwd"]["config"]["calls"] == ["model.cca", "model.cca"]
    assert fast["fwd"]["config"]["swapped"] == config["swapped"]
    assert len([t for t in report["targets"] if t["case"] == parts]) == 2


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.conv(x)


def plain_head(heads, name: str):
    return heads.Head(name, lambda n: 4, lambda n: heads.Harness(Plain(), lambda m, x: m(x)))


def test_nothing_swapped_is_skipped_not_timed(heads, tmp_path, monkeypatch):
    monkeypatch.setitem(heads.HEADS, "fake-Plain", plain_head(heads, "fake-Plain"))
    assert heads.main(["--quick", "--size", "1x5x7", "--heads", "fake-Plain", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    case = "fake-Plain-B1-5x7-width/8"
    assert set(rows_of(report, case, "original")) == {"fwd", "bwd", "fwd+bwd"}
    fast = rows_of(report, case, "swapped")
    assert list(fast) == ["-"] and fast["-"]["median_ms"] is None
    assert fast["-"]["status"].startswith("skipped: nothing swapped: fastctx.swap recognises no module of fake-Plain")
    assert f"| {case} | swapped | **skipped: nothing swapped" in (tmp_path / "report.md").read_text()
    for cand in ("original", "swapped"):  # nor the replaced modules alone: there are none
        [row] = rows_of(report, case + "-swapped-modules", cand).values()
        assert row["status"].startswith("skipped: nothing swapped") and row["median_ms"] is None


def test_a_swapped_head_that_differs_fails_parity_loudly(heads, tmp_path, monkeypatch, capsys):
    def wrong_swap(model, backend=None, strict=False):  # "swaps" in a head that computes otherwise
        model = copy.deepcopy(model)
        model.run = lambda m, x: m(x) * 1.01
        return model, SwapReport(swapped=[SwapEntry("model", "Plain", "Wrong")])

    monkeypatch.setattr(heads, "swap", wrong_swap)
    monkeypatch.setitem(heads.HEADS, "fake-Wrong", plain_head(heads, "fake-Wrong"))
    assert heads.main(["--quick", "--size", "1x5x7", "--heads", "fake-Wrong", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    [row] = rows_of(report, "fake-Wrong-B1-5x7-width/8", "swapped").values()
    assert row["status"].startswith("FAILED parity") and row["median_ms"] is None
    assert "PARITY FAILED" in capsys.readouterr().err


def test_a_missing_toolbox_names_what_to_install(heads, monkeypatch, capsys):
    from tests import toolboxes

    def missing():
        raise ImportError("No module named 'mmseg'")

    monkeypatch.setattr(toolboxes, "mmseg", missing)
    with pytest.raises(SystemExit) as info:
        heads.main(["--heads", "mmseg-CCHead"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "mmsegmentation==1.2.2" in err and "make test" in err and "No module named" in err
