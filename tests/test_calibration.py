import pytest

from autotune.errors import UserError
from autotune.sim.calibration import DEFAULT, Calibration
from autotune.sim.predict import predict
from autotune.spec.layout import Layout


def test_a_calibration_file_replaces_the_factors(tmp_path, make_scenario):
    f = tmp_path / "cal.yaml"
    f.write_text("efficiency: {hbm: 0.6}\ngpus: {H100-SXM: {hbm: 0.5}}\n")
    cal = Calibration.load(f)
    assert cal.for_gpu("H200").hbm == 0.6 and cal.for_gpu("H100-SXM").hbm == 0.5
    assert cal.for_gpu("H200").flops == DEFAULT.flops
    from dataclasses import replace
    sc = make_scenario("Llama-3.1-8B", gpus=1, num_requests=200)
    base = predict(sc, Layout()).get("output_tok_s")
    slow = predict(replace(sc, calibration=cal), Layout()).get("output_tok_s")
    assert slow < base


def test_round_trip(tmp_path):
    cal = Calibration(DEFAULT.with_overrides({"hbm": 0.7}, "t"))
    cal.save(tmp_path / "c.yaml")
    assert Calibration.load(tmp_path / "c.yaml").base.hbm == 0.7


@pytest.mark.parametrize("text,msg", [("efficiency: {hbm_x: 1}", "unknown efficiency factor"),
                                      ("efficiency: {hbm: 2}", "out of range"),
                                      ("efficiency: [1, 2", "not valid YAML"),
                                      ("- 1", "expected a mapping")])
def test_bad_calibration_files(tmp_path, text, msg):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=msg):
        Calibration.load(f)


def test_the_accuracy_fit_gives_each_source_one_vote_and_clips_wild_rows(monkeypatch):
    """bench/accuracy.py's loss: a source of many rows weighs as much as a source of one, and a row off by more
    than the clip counts as the clip."""
    import math
    from pathlib import Path
    from types import SimpleNamespace
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import CLIP, loss

    big, small = SimpleNamespace(source="big"), SimpleNamespace(source="small")
    rows = [(big, "tpot_mean_s", 1.0, 1.5)] * 10 + [(small, "tpot_mean_s", 1.0, 1.0)]
    assert loss(rows) == pytest.approx(math.log(1.5) / 2)
    wild = [(big, "tpot_mean_s", 1.0, 50.0), (big, "output_tok_s", 1.0, None)]
    assert loss(wild) == pytest.approx(CLIP) and CLIP < math.log(50)
