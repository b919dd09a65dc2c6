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
