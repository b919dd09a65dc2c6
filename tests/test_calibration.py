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
                                      ("- 1", "expected a mapping"),
                                      ("hbm: 0.5", "unknown key.*hbm.*under 'efficiency'"),
                                      ("gpus: {H1OO: {hbm: 0.5}}", "unknown GPU 'H1OO'; did you mean H100-SXM"),
                                      (b"\xff\xfe", "not a readable text file"),
                                      ("gpus: {H100: {hbm: 0.5}, H100-SXM: {hbm: 0.6}}", "the same GPU is named twice")])
def test_bad_calibration_files(tmp_path, text, msg):
    """Refused with the reason, never read as the defaults: a factor outside 'efficiency' or under a GPU name the
    catalog does not know would otherwise apply nowhere, silently."""
    f = tmp_path / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=msg):
        Calibration.load(f)


def test_a_gpu_alias_in_a_calibration_file_applies_to_that_gpu(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gpus: {H100: {hbm: 0.5}}\n")
    assert Calibration.load(f).for_gpu("H100-SXM").hbm == 0.5


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


def test_validation_rows_replay_the_prefixes_an_earlier_run_on_the_same_server_cached(monkeypatch, tmp_path):
    """A row's cached_prompt_tokens reaches the replayed workload (the runs of one server, same seed, after the
    first); a file without the column replays with none."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from validation_set import ROWS_DIR, load_rows

    runs = [r for r in load_rows() if r.source == "scicom-benchmaxxing-runpod"]
    cached = {(r.workload.prompt.value, r.workload.cached_prompt_tokens) for r in runs}
    assert {(2048, 1024), (4096, 2048), (8192, 4096), (15000, 8192), (1024, 0)} == cached
    assert all("cached" in r.label for r in runs if r.workload.cached_prompt_tokens)
    # The optional columns are each file's last: an older file is the same without them.
    lines = (ROWS_DIR / "rows_ground_truth.csv").read_text().splitlines()
    assert lines[0].endswith(",cached_prompt_tokens,range_ratio")
    (tmp_path / "rows_old.csv").write_text("\n".join(line.rsplit(",", 2)[0] for line in lines) + "\n")
    old = load_rows(tmp_path)
    assert old and all(r.workload.cached_prompt_tokens == 0 and r.workload.prompt.kind == "fixed" for r in old)


def test_validation_rows_spread_their_lengths_as_a_stated_range_ratio_does(monkeypatch, tmp_path):
    """vllm bench serve --random-range-ratio r draws lengths uniformly in mean x [1 - r, 1 + r]: a closed loop of
    fixed lengths would march in waves that the real, spread run never forms. A ratio of 1 or more is refused."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from validation_set import ROWS_DIR, load_rows

    runs = [r for r in load_rows() if r.source == "vllm-blog-2026-04-22-fp8-kvcache"]
    assert runs and all(r.workload.prompt.bins == ((1.0, 17000, 23000),) for r in runs)
    assert all(r.workload.output.bins == ((1.0, 1700, 2300),) for r in runs)
    lines = (ROWS_DIR / "rows_dense.csv").read_text().splitlines()
    (tmp_path / "rows_bad.csv").write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",1.5"]) + "\n")
    with pytest.raises(SystemExit, match="range_ratio"):
        load_rows(tmp_path)
    # ShareGPT rows draw their own lengths: a spread stated there would be silently ignored, so it is refused.
    import csv
    with open(ROWS_DIR / "rows_dense.csv", newline="") as f:
        reader = csv.DictReader(f)
        row = next(r for r in reader if r["dataset"].strip().lower() == "sharegpt")
    with open(tmp_path / "rows_bad.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerow({**row, "range_ratio": "0.2"})
    with pytest.raises(SystemExit, match="ShareGPT"):
        load_rows(tmp_path)


def test_the_accuracy_report_by_source_shows_each_sources_bias(monkeypatch, capsys):
    from pathlib import Path
    from types import SimpleNamespace
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import print_sources

    slow, fast = SimpleNamespace(source="slow-src"), SimpleNamespace(source="fast-src")
    print_sources([(slow, "tpot_mean_s", 1.0, 1.5), (slow, "tpot_p50_s", 1.0, 1.3), (slow, "tpot_p99_s", 1.0, 1.4),
                   (fast, "output_tok_s", 100.0, 80.0), (fast, "output_tok_s", 100.0, None)])
    lines = {tuple(line.split()[:3]): line.split()[3:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines[("slow-src", "TPOT/ITL", "3")] == ["+40.0%", "40.0%"]     # medians of +50, +30, +40%
    assert lines[("fast-src", "throughput", "2")][0] == "+inf%"           # an infeasible run counts as unbounded


def test_the_factors_each_fold_fitted_are_shown_where_they_left_the_priors(monkeypatch, capsys):
    """bench/accuracy.py --factors: per cross-validation fold, the factors fitted without it that moved from the
    priors, a bound marked as such, and a GPU's own factors; a fold whose fit kept the priors says so."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import FITTED, PRIOR, print_factors

    moved = PRIOR.base.with_overrides({"hbm": FITTED["hbm"][1], "step_overhead_s": 3e-3}, "test")
    mi300x = moved.with_overrides({"flops": 0.45}, "test")
    print_factors([(["src-a"], Calibration(moved, (("MI300X", mi300x),), "fit")), (["src-b", "src-c"], PRIOR)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip() == "without src-a:"
    assert out[1].strip() == "hbm 0.95 (bound), step_overhead_s 0.003"
    assert out[2].strip() == "MI300X: flops 0.45"
    assert out[3:] == ["  without src-b, src-c:", "    the priors"]


def test_the_stages_of_a_staged_run_are_scored_alone_and_by_their_growth(tmp_path, monkeypatch, capsys):
    """bench/accuracy.py --stages: a run measured over two constant-rate stages (the shared sim-to-real runs' format)
    keeps each stage's means, replays each stage alone at its rate, and reports how the means grow with the rate."""
    import csv
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import PRIOR, print_stages
    from validation_set import load_simreal

    row = {"model_hf": "meta-llama/Llama-3.1-8B-Instruct", "model_ref": "Llama-3.1-8B", "gpu_ours": "H100-SXM",
           "tp": "1", "dp": "1", "workload": "codegen", "stage_rates": "2.0;8.0", "stage_durations_s": "30;30",
           "input_len": "566", "output_len": "247", "system_prompt_len": "100", "num_unique_system_prompts": "4",
           "max_num_seqs": "128", "max_num_batched_tokens": "2048", "max_model_len": "4096", "gpu_mem_util": "0.9",
           "confidence": "high", "gt_e2e_mean_ms": "2000", "gt_ttft_mean_ms": "25", "gt_itl_mean_ms": "8",
           "gt_s0_e2e_mean_ms": "1800", "gt_s0_ttft_mean_ms": "24", "gt_s0_itl_mean_ms": "7.2",
           "gt_s1_e2e_mean_ms": "2100", "gt_s1_ttft_mean_ms": "26", "gt_s1_itl_mean_ms": "9.0"}
    path = tmp_path / "simreal.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    (run,) = load_simreal(path)
    second = run.stage_alone(1)
    assert [(s.rate, s.num_requests) for s in second.workload.stages] == [(8.0, 240)]
    assert second.workload.num_requests == 240
    assert dict(second.figures) == {"e2e_mean_s": 2.1, "ttft_mean_s": 0.026, "tpot_mean_s": 0.009}
    print_stages([run], PRIOR)
    itl = [line.split() for line in capsys.readouterr().out.splitlines() if "tpot_mean_s" in line]
    assert len(itl) == 2 and itl[1][-2] == "+25.0%"                  # 9.0 / 7.2 ms measured
    assert float(itl[1][-1].rstrip("%")) > 0                         # four times the rate costs the decodes more


def test_the_kernel_fit_recovers_the_factors_that_made_the_timings():
    """Timings made by the step model's own kernel laws from known factors come back as those factors, from the
    priors: the fit bench/gpu_probe.py runs on a GPU's measured kernels."""
    from dataclasses import replace
    from autotune.sim import kernel_fit
    from autotune.spec.hardware import load_gpu
    from autotune.spec.models import load_model
    gpu = load_gpu("H200")
    truth = DEFAULT.with_overrides({"hbm": 0.7, "kv_read": 0.6, "flops": 0.45, "gemm_ramp_tokens": 64.0,
                                    "kernel_floor_s": 3e-6}, "t")
    kernels = kernel_fit.decode_kernels(load_model("Llama-3.1-8B"), 1, [1, 4, 16, 64, 256, 1024], [1024, 8192, 32768])
    timings = [replace(k, seconds=kernel_fit.modelled_s(k, gpu, truth)) for k in kernels]
    assert kernel_fit.log_error(timings, gpu, DEFAULT) > 0.1
    fitted = kernel_fit.fit(timings, gpu, DEFAULT)
    assert kernel_fit.log_error(timings, gpu, fitted) < 0.02
    for name in ("hbm", "kv_read", "flops", "gemm_ramp_tokens"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.15), name


def test_the_gpu_probe_times_kernels_and_writes_a_calibration_predict_uses(tmp_path):
    """bench/gpu_probe.py --quick on this machine's CPU: a real kernel table, factors fitted to it that predict the
    second model's kernels far better than the priors (out of sample), and a calibration file the CLI reads."""
    pytest.importorskip("torch")
    import json
    import subprocess
    import sys
    from pathlib import Path
    from autotune.sim import kernel_fit
    from autotune.spec.hardware import load_gpu
    root = Path(__file__).resolve().parents[1]
    out, table = tmp_path / "cal.yaml", tmp_path / "kernels.csv"
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_probe.py"), "--quick", "--out", str(out),
                           "--table", str(table)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    timings = kernel_fit.read_table(table)
    assert {t.kernel for t in timings} == {"qkv", "o", "gate_up", "down", "attention"}
    cal = Calibration.load(out)
    cpu = cal.for_gpu("CPU")
    assert cpu != cal.base
    # Out of sample: fitted on the first model's kernels, the second's are predicted better than by the priors (by
    # how much depends on the CPU: here 0.25 against 2.0 in log terms), as the probe prints.
    first, second = ([t for t in timings if t.model == m] for m in (timings[0].model, timings[-1].model))
    held = kernel_fit.fit(first, load_gpu("CPU"), DEFAULT)
    assert kernel_fit.log_error(second, load_gpu("CPU"), held) < kernel_fit.log_error(second, load_gpu("CPU"), DEFAULT)
    assert "(out of sample)" in done.stdout
    from autotune.tiny_model import tiny_config
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    args = [sys.executable, "-m", "autotune.cli", "predict", "--model", str(tmp_path / "config.json"), "--gpu", "CPU",
            "--gpus", "1", "--layout", "tp=1", "--requests", "20", "--json"]
    plain = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)[0]
    probed = json.loads(subprocess.run(args + ["--calibration", str(out)], capture_output=True, text=True,
                                       check=True).stdout)[0]
    assert probed["tpot_mean_s"] != plain["tpot_mean_s"]


def test_a_kernel_table_that_is_not_one_is_refused(tmp_path):
    from autotune.sim import kernel_fit
    bad = tmp_path / "k.csv"
    bad.write_text("model,kernel,rows\nx,qkv,notanumber\n")
    with pytest.raises(UserError, match="not a kernel table"):
        kernel_fit.read_table(bad)


@pytest.mark.parametrize("args,msg", [(["--gpu", "H900"], "unknown GPU"),
                                      (["--table", "/nonexistent/k.csv"], "directory does not exist")])
def test_the_gpu_probe_refuses_bad_input_with_one_line_before_timing(tmp_path, args, msg):
    pytest.importorskip("torch")
    import subprocess
    import sys
    from pathlib import Path
    probe = Path(__file__).resolve().parents[1] / "bench" / "gpu_probe.py"
    done = subprocess.run([sys.executable, str(probe), "--quick", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and msg in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
