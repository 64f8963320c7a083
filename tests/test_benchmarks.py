"""The benchmarks' measurement helpers (benchmarks/train_step.py) and CPU smoke runs, on CPU."""

import importlib.util
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType

from drifting.feature_loss import RANGES

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    # As when run as a script: the benchmarks' own folder is on the path, for the helpers they share.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Event:
    """The methods of a kineto event that range_device_ms reads."""

    def __init__(self, name, device, start, end, corr=0, linked=0, annotation=False):
        self._v = (name, device, start, end, corr, linked, annotation)

    def name(self): return self._v[0]
    def device_type(self): return self._v[1]
    def start_ns(self): return self._v[2]
    def end_ns(self): return self._v[3]
    def duration_ns(self): return self._v[3] - self._v[2]
    def correlation_id(self): return self._v[4]
    def linked_correlation_id(self): return self._v[5]
    def is_user_annotation(self): return self._v[6]


def test_range_device_ms_counts_each_device_event_once_by_its_launch_time():
    bench = _load("train_step")
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    ms = 1_000_000
    events = [
        _Event("outer", cpu, 0, 10 * ms), _Event("inner", cpu, 2 * ms, 4 * ms),
        _Event("outer", cpu, 20 * ms, 21 * ms),  # a second opening of the same range
        _Event("cudaLaunchKernel", cpu, 1 * ms, 1 * ms + 5, corr=1, linked=100),   # in outer
        _Event("cuLaunchKernel", cpu, 3 * ms, 3 * ms + 5, corr=2, linked=101),     # in outer and inner
        _Event("cudaLaunchKernel", cpu, 15 * ms, 15 * ms + 5, corr=3, linked=102),  # in neither
        _Event("cudaMemsetAsync", cpu, 20 * ms, 20 * ms + 5, corr=4, linked=103),  # in outer's second opening
        # the device work runs later than its launch: only the launch time places it
        _Event("k1", gpu, 30 * ms, 37 * ms, corr=1), _Event("k2", gpu, 40 * ms, 42 * ms, corr=2),
        _Event("k3", gpu, 43 * ms, 44 * ms, corr=3), _Event("memset", gpu, 45 * ms, 45 * ms + ms // 2, corr=4),
        _Event("unlaunched", gpu, 50 * ms, 60 * ms, corr=99),  # no launch seen: in no range
        _Event("outer", gpu, 30 * ms, 42 * ms, corr=5, annotation=True),  # the range's own GPU span: not work
    ]
    out = bench.range_device_ms(events, ("outer", "inner", "never opened"))
    assert out["outer"] == {"gpu": 7 + 2 + 0.5, "host": 11.0}
    assert out["inner"] == {"gpu": 2.0, "host": 2.0}
    assert "never opened" not in out
    assert out["(all device work matched to a launch)"]["gpu"] == 7 + 2 + 1 + 0.5


def test_train_step_profile_names_the_loss_parts(tmp_path):
    """A profiled CPU step of the debug preset in two class chunks reports every range of FeatureDriftLoss."""
    bench = _load("train_step")
    out = tmp_path / "step.json"
    argv = sys.argv
    sys.argv = ["train_step.py", "--preset", str(ROOT / "configs/gen/debug.yaml"), "--device", "cpu", "--warmup", "1",
                "--iters", "1", "--class-chunk", "2", "--profile", str(tmp_path / "profile.txt"), "--out", str(out),
                "train.stats_keep_features=true", "train.stats_stack_below=128", "train.stats_stacked_losses=true"]
    try:
        bench.main()
    finally:
        sys.argv = argv
    ranges = json.loads(out.read_text())["profile"]["gpu_ms_by_range"]
    assert set(RANGES) <= set(ranges) and set(bench.STEP_RANGES) <= set(ranges)
    assert all(r["host"] > 0 for name, r in ranges.items() if name in bench.STEP_RANGES)


def test_memsets_benchmark_runs_on_cpu_and_checks_its_arguments(tmp_path, monkeypatch, capsys):
    bench = _load("memsets")
    out = tmp_path / "memsets.json"
    monkeypatch.setattr(sys, "argv", ["memsets.py", "--device", "cpu", "--samples", "2", "--tokens", "4",
                                      "--iters", "1", "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * len(bench.LINEARS) + 3  # forward and backward per linear, two convolutions, attention
    assert all(set(r) == {"memsets", "memset_us", "kernel_us", "kernels"} for r in rows.values())
    monkeypatch.setattr(sys, "argv", ["memsets.py", "--device", "cpu", "--tokens", "0"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "--tokens: expected a positive integer, got 0" in capsys.readouterr().err


def test_compile_mode_without_anything_to_compile_is_refused_before_any_work(monkeypatch, capsys):
    for name, argv in [("generator_step", ["--presets", "DiT-tiny", "--device", "cpu"]),
                       ("train_step", ["--preset", str(ROOT / "configs/gen/debug.yaml"), "--device", "cpu"])]:
        bench = _load(name)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv, "--compile-mode", "max-autotune-no-cudagraphs"])
        with pytest.raises(SystemExit) as exit_info:
            bench.main()
        message = str(exit_info.value.code) + capsys.readouterr().err
        assert "--compile-mode: expected --compile" in message, name


def test_cuda_builds_benchmark_runs_older_builds_at_gradient_factor_one(tmp_path):
    """A build from before drift_loss(reduction=...) has no grad_factor in its launch: the tool passes the library's
    factor 1 on and refuses any other (that build cannot write a reduced loss's gradient); today's build takes it."""
    bench = _load("drift_cuda_builds")
    old = {"drift_cuda.py": "CALLS = []\ndef norm_width(c_n):\n    return 8\n"
                            "def launch(pass_, *args, normalize='xy'):\n    CALLS.append((pass_, args, normalize))\n",
           "drift_cuda.cu": ""}
    module = bench.load_build("old", old, tmp_path, 0)
    module.launch(3, "x", normalize="y", grad_factor=1.0)
    assert module.CALLS == [(3, ("x",), "y")] and module.norm_floats(16, 3) == 24
    with pytest.raises(ValueError, match="factor 1"):
        module.launch(3, "x", grad_factor=0.5)
    today = bench.load_build("today", bench.build_files(str(ROOT / "drifting" / "kernels")), tmp_path, 1)
    assert "grad_factor" in inspect.signature(today.launch).parameters


def test_cuda_builds_benchmark_finds_every_build_before_any_work(tmp_path, monkeypatch, capsys):
    """Each build is a directory with drift_cuda.{py,cu}, git:REV or "current"; a wrong one is named, before the
    benchmark asks for a GPU."""
    bench = _load("drift_cuda_builds")
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "drift_cuda.py").write_text("")
    texts = bench.build_files(str(ROOT / "drifting" / "kernels"))
    assert set(texts) == {"drift_cuda.py", "drift_cuda.cu"} and "drift_kernel" in texts["drift_cuda.cu"]
    assert bench.build_files("current") is None
    for argv, expected in [([str(folder)], f"build '{folder}': expected a directory with drift_cuda.py and "
                                           "drift_cuda.cu, 'git:REV' or 'current' (missing: drift_cuda.cu)"),
                           (["current", "--repeat", "0"], "--repeat: expected a positive integer, got 0")]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    if (ROOT / ".git").exists() and shutil.which("git"):
        with pytest.raises(SystemExit):
            bench.main(["git:no-such-revision"])
        assert "build 'git:no-such-revision': git has no drifting/kernels/drift_cuda.py" in capsys.readouterr().err
        assert "drift_kernel" in bench.build_files("git:HEAD")["drift_cuda.cu"]
    if not torch.cuda.is_available():  # the builds are found; then the GPU is asked for
        with pytest.raises(SystemExit):
            bench.main(["current", str(ROOT / "drifting" / "kernels")])
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_whatif_builds_are_todays_kernel_with_their_edits_and_a_stale_edit_is_named(tmp_path, capsys):
    """drift_cuda_whatif.py: each timing-only build is today's kernel with its edits and nothing else, in a folder
    that drift_cuda_builds.py takes; an edit whose text the kernel no longer has is named before anything is
    written."""
    bench = _load("drift_cuda_whatif")
    kernels = ROOT / "drifting" / "kernels"
    source = (kernels / "drift_cuda.cu").read_text()
    low = "    for (int kk = 0; kk < NK; ++kk) wgmma_rs(f, alo[kk], smem_desc(base + kk * 2048), 1);\n"
    assert source.count(low) == 1
    folders = bench.main(["--out", str(tmp_path / "whatif")])
    assert [f.name for f in folders] == ["no_lo_pass2", "fp16_pass2", "no_lo"]
    texts = {f.name: _load("drift_cuda_builds").build_files(str(f)) for f in folders}
    for files in texts.values():
        assert files["drift_cuda.py"] == (kernels / "drift_cuda.py").read_text()
    only_pass3 = "    if constexpr (PASS3)\n" + low
    assert texts["no_lo_pass2"]["drift_cuda.cu"] == source.replace(low, only_pass3)
    assert texts["no_lo"]["drift_cuda.cu"] == source.replace(low, "")
    fp16 = texts["fp16_pass2"]["drift_cuda.cu"]
    sweep_start, sweep_end = fp16.index("  if constexpr (PASS == 2) {  // what-if"), fp16.index(
        "  if constexpr (PASS == 1) {  // [sum_ij")
    assert "cvt.rn.f16x2.f32" in fp16[sweep_start:sweep_end]
    assert fp16[:sweep_start] + fp16[sweep_end:] == source.replace(low, only_pass3)
    with pytest.raises(ValueError, match="build 'no_lo': the kernel has 0 copies of 'for \\(int kk"):
        bench.edited(source.replace(low, ""), "no_lo")
    for argv, expected in [(["--builds", "no_lo,faster"], "build 'faster': expected one of no_lo_pass2, "),
                           (["--builds", ","], "--builds: expected at least one build")]:
        with pytest.raises(SystemExit):
            bench.main(["--out", str(tmp_path / "never"), *argv])
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_power_draw_summarises_clocks_and_throttling_of_the_busy_samples(tmp_path, monkeypatch, capsys):
    """power_draw runs the command while nvidia-smi samples (here a stand-in that prints four samples: one idle, two
    busy under the power cap, one busy at full clock, one it could not fill); the summary covers the busy ones."""
    bench = _load("power_draw")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1980, 80.5, 700.00, 40, 0x0000000000000001'\n"
                    "echo '1470, 690.0, 700.00, 56, 0x0000000000000004'\necho '1830, 695.0, 700.00, 58, 0x0004'\n"
                    "echo '1980, 400.0, 700.00, 50, 0x0000000000000000'\necho '[N/A], [N/A], 700.00, 50, 0x0'\n"
                    "sleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench.shutil, "which", lambda name: str(fake))
    out = tmp_path / "samples.csv"
    result = bench.main(["--out", str(out), "--", sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert result["samples"] == 4 and result["busy_samples"] == 3 and result["returncode"] == 0
    assert result["clock_mhz_median"] == 1830 and result["clock_mhz_lowest"] == 1470
    assert result["power_w_highest"] == 695.0 and result["limit_w"] == 700.0
    assert result["throttled_share"]["sw_power_cap"] == pytest.approx(2 / 3)
    assert result["throttled_share"]["hw_slowdown"] == 0
    assert "sw_power_cap 67%" in capsys.readouterr().out and len(out.read_text().splitlines()) == 6
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    for argv, expected in [(["--"], "command: expected the command to run after --"),
                           (["--interval-ms", "0", "--", "true"], "--interval-ms: expected a positive integer"),
                           (["--", "true"], "needs nvidia-smi")]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_drift_loss_benchmark_idles_between_calls_when_asked(monkeypatch, capsys):
    """--idle-ms sleeps that long before each timed call (none by default); a negative value is refused."""
    bench = _load("drift_loss")
    sleeps = []
    monkeypatch.setattr(bench.time, "sleep", sleeps.append)
    calls = []
    bench.time_impl("reference", (), "cpu", 3, step=lambda impl: calls.append(impl), idle_ms=25)
    assert sleeps == [0.025] * 3 and len(calls) == 4  # a warm-up, then three timed calls
    bench.time_impl("reference", (), "cpu", 2, step=lambda impl: calls.append(impl))
    assert sleeps == [0.025] * 3
    monkeypatch.setattr(sys, "argv", ["drift_loss.py", "--idle-ms", "-1", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and "--idle-ms: expected a number >= 0, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize("script, cases", [
    ("scale_problems", [(["--problems", "0"], "--problems: expected a positive integer, got 0")]),
    ("host_time", [(["--problems", "0"], "--problems: expected a positive integer, got 0"),
                   (["--repeat", "-2"], "--repeat: expected a positive integer, got -2")]),
])
def test_gpu_benchmarks_check_their_arguments_before_asking_for_a_gpu(script, cases, capsys):
    bench = _load(script)
    if not torch.cuda.is_available():
        cases = cases + [([], "needs a CUDA GPU")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_force_precision_study_builds_the_reference_field_and_orders_the_roundings(capsys):
    """force_precision.py: its coefficients give the reference's field (drift.field_from_affinity at the reference's
    affinities), and the roundings' errors come out in the order of their bits."""
    from drifting.drift import affinity, field_from_affinity, pairwise_distance

    bench = _load("force_precision")
    x, targets, weights = bench.problems(3, offset=1.0)
    dist = pairwise_distance(x, targets)
    scale = (dist * weights[:, None, :]).sum() / (weights.sum() * x.shape[1])
    normalized = dist / scale + torch.eye(x.shape[1], targets.shape[1], dtype=x.dtype) * 100.0
    for tau, coef in zip(bench.TEMPERATURES, bench.coefficients(x, targets, weights)):
        field = field_from_affinity(affinity(-normalized / tau, "xy", 1e-6), x, targets, bench.C_G + bench.C_N,
                                    weights)
        torch.testing.assert_close(coef @ targets, field, rtol=1e-5, atol=1e-5 * field.abs().max().item())
    result = bench.main(["--problems", "3", "--offset", "0", "2"])
    for r in result:
        errors = {how: max(r["per_problem_error"][how]) for how in bench.ROUNDINGS}
        assert errors["bf16 hi+lo"] < errors["fp16"] / 10 and errors["fp16"] < errors["bf16"] / 2, errors
        assert r["fp16_target_change"] == 0.0  # bf16 values of these sizes are exact in fp16
    assert "offset 2 (median |y| / |y - x|" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rounding 'fp8': expected one of bf16 hi\\+lo, bf16, fp16"):
        bench.rounded(x, "fp8")


def test_kernel_profile_sums_stall_samples_by_line_of_the_kernel(tmp_path, capsys):
    """`profile_drift_kernel.py lines`: ncu's samples per instruction summed by source line, code inlined into the
    kernel counted at its call site; bad input is named before any work."""
    bench = _load("profile_drift_kernel")
    listing = "\n".join([
        '\t//## File "drift_cuda.cu", line 3',
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;",
        '\t//## File "drift_cuda.cu", line 1 inlined at "drift_cuda.cu", line 4',
        "        /*0010*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0020*/                   MUFU.EX2 R2, R2 ;",
        '\t//## File "drift_cuda.cu", line 3',
        "        /*0030*/                   EXIT ;",
    ])
    table = bench.line_table(listing)
    assert table == {0x0: 3, 0x10: 4, 0x20: 4, 0x30: 3}
    header = ["Address", "Source", bench.SAMPLES, "stall_wait", "stall_short_sb", "stall_wait (Not Issued)"]
    rows = [["==PROF== Connected"], header,
            ["0x7f0000001000", "LDC", "2", "2", "0", "1"],
            ["0x7f0000001010", "FFMA", "5", "4", "1", "3"],
            ["0x7f0000001020", "MUFU", "3", "0", "3", "0"],
            ["0x7f0000001030", "EXIT", "0", "0", "0", "0"]]
    total, per_line, why = bench.stall_lines(rows, table)
    assert total == 10 and per_line == {4: 8, 3: 2}
    assert why[4] == {"wait": 4, "short_sb": 4} and why[3] == {"wait": 2, "short_sb": 0}
    text = bench.report(total, per_line, why, ["x", "y", "loop();", "force();"], top=5)
    assert text.splitlines()[1].split()[:3] == ["80.0%", "L4", "force();"]
    with pytest.raises(ValueError, match="no 'Address' header"):
        bench.stall_lines(rows[:1], table)

    (tmp_path / "pass2.csv").write_text("\n".join(",".join(f'"{c}"' for c in row) for row in rows) + "\n")
    (tmp_path / "pass2.sass").write_text(listing)
    (tmp_path / "k.cu").write_text("x\ny\nloop();\nforce();\n")
    bench.main(["lines", str(tmp_path / "pass2.csv"), str(tmp_path / "pass2.sass"), "--source", str(tmp_path / "k.cu")])
    assert "80.0%  L4     force();" in capsys.readouterr().out
    for argv, expected in [(["lines", str(tmp_path / "none.csv"), str(tmp_path / "pass2.sass")], "csv: no such file"),
                           (["lines", str(tmp_path / "pass2.csv"), str(tmp_path / "pass2.sass"), "--top", "0"],
                            "--top: expected a positive integer, got 0"),
                           (["run", "--cubins", str(tmp_path), "--problems", "0"],
                            "--problems: expected a positive integer, got 0")]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    (tmp_path / "plain.sass").write_text("        /*0000*/   EXIT ;\n")
    with pytest.raises(SystemExit, match="no line information"):
        bench.main(["lines", str(tmp_path / "pass2.csv"), str(tmp_path / "plain.sass")])


def test_kernel_classes_name_the_step_kernels_as_the_profiles_list_them():
    """Kernel names taken from the step's profiles (docs/data): cuDNN's attention says "fprop" as its convolutions do,
    and its convolutions say "implicit_gemm" as products might; each must land in its own class."""
    classes = _load("kernel_classes")
    expected = {
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "matrix products (cuBLAS)",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matrix products (cuBLAS)",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128": "convolutions (cuDNN)",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolutions (cuDNN)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>": "layout conversions (cuDNN)",
        "triton_tem_fused_addmm_0": "matrix products (inductor's Triton templates)",
        "triton_poi_fused__to_copy_add_cat_mul_neg_permute_split_unbind_view_0": (
            "compiled elementwise and reductions (inductor)"),
        "_drift_kernel": "drifting kernels (ours)",
        "void drift_kernel<3, 1, 64, 8>(float const*)": "drifting kernels (ours)",
        "_tap_stats_fwd": "drifting kernels (ours)",
        "Memset (Device)": "memset / memcpy",
        "Memcpy DtoD (Device -> Device)": "memset / memcpy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": (
            "other kernels (aten elementwise, reductions, copies)"),
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4>": (
            "other kernels (aten elementwise, reductions, copies)"),
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication (NCCL)",
        "fmt_a_kernel_of_someone_else": "other kernels (aten elementwise, reductions, copies)",
        "someone_elses_op": classes.OTHER,
    }
    assert {name: classes.kernel_class(name) for name in expected} == expected


class _FunctionEvent:
    """The attributes of a profiler FunctionEvent that device_ms_by_class reads."""

    def __init__(self, name, device, us, annotation=False):
        self.name, self.device_type, self.is_user_annotation = name, device, annotation
        self.time_range = type("Interval", (), {"elapsed_us": lambda _self: us})()


def test_device_ms_by_class_sums_device_work_only_largest_first():
    classes = _load("kernel_classes")
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        _FunctionEvent("aten::mm", cpu, 9_000),  # host time: not device work
        _FunctionEvent("nvjet_tst_a", gpu, 3_000), _FunctionEvent("nvjet_tst_b", gpu, 1_500),
        _FunctionEvent("triton_poi_fused_add_0", gpu, 2_000),
        _FunctionEvent("generator forward", gpu, 50_000, annotation=True),  # a range's GPU span: not work
        _FunctionEvent("gpu_user_annotation", gpu, 40_000),
        _FunctionEvent("Memset (Device)", gpu, 1),
    ]
    out = classes.device_ms_by_class(events)
    assert out == {"matrix products (cuBLAS)": (4.5, 2), "compiled elementwise and reductions (inductor)": (2.0, 1),
                   "memset / memcpy": (0.001, 1)}
    assert list(out) == ["matrix products (cuBLAS)", "compiled elementwise and reductions (inductor)",
                         "memset / memcpy"]
    table = classes.format_classes(out)
    assert "6.5 ms of device work" in table and "69.2%" in table and "30.8%" in table
