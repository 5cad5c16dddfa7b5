"""benchmarks/decode_speed.py: its flags hold for the run only, and its matmul-only ceiling covers
exactly the matmuls of a pass."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decode_ceilings import decode_matmuls, matmul_bound_tokens_per_s, matmul_only_passes_per_s, weight_bytes_per_pass
from decode_speed import main, random_model

pytestmark = pytest.mark.slow  # the slow tier: `make test-fast` skips it

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_speed.py"


@pytest.mark.parametrize("fused", [False, True])
def test_decode_matmuls_are_every_weight_a_pass_reads_but_the_norms(fused: bool):
    model = random_model("tiny", torch.float32, torch.device("cpu"))
    if fused:
        model.prepare_for_decoding()
    mms = decode_matmuls(model)
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert sum(w.numel() * w.element_size() for _, w in mms) == weight_bytes_per_pass(model) - norms
    assert len(mms) == model.config.num_hidden_layers * (4 if fused else 7) + 1
    assert mms[-1][1] is model.lm_head.weight
    rate = matmul_only_passes_per_s(model, rows=4, repeats=1)
    assert rate > 0 and rate != float("inf")
    commit = matmul_only_passes_per_s(model, rows=8, repeats=1, head_rows=4)  # a fused commit pass
    assert commit > 0 and commit != float("inf")


def test_matmul_bound_rate_counts_one_commit_pass_per_block():
    # 2 blocks of 4 passes: 3 block steps at 100 passes/s and one commit pass at 50 each -> 0.1 s
    run = {"nfe": 8, "tokens": 8}
    assert matmul_bound_tokens_per_s(run, step_rate=100.0, commit_rate=50.0, blocks=2) == pytest.approx(80.0)
    # batch 4: the same passes make four times the tokens
    assert matmul_bound_tokens_per_s({"nfe": 8, "tokens": 32}, 100.0, 50.0, 2) == pytest.approx(320.0)


def test_fold_query_groups_flag_is_recorded_and_restored(monkeypatch, capsys):
    """--fold-query-groups sets the device's folding policy for the run only, and the JSON and the
    command record what the run used (including torch/inductor settings from the environment)."""
    from diffcoder import kernels

    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "0")
    before = kernels.current_policy()
    flags = ["--shape", "tiny", "--device", "cpu", "--gen-length", "8", "--prompt-len", "8", "--repeats", "1",
             "--no-baseline"]
    for choice, want in (("off", False), ("on", True), ("auto", before.folds_query_groups("cpu"))):
        out = main([*flags, "--fold-query-groups", choice])
        assert out["fold_query_groups"] is want
        assert out["weight_read_passes_per_s"] > 0 and out["weight_read_bandwidth_fraction"] > 0
        assert kernels.current_policy() == before
        assert out["command"].startswith("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 python benchmarks/decode_speed.py")
    assert f"query-group folding {want}" in capsys.readouterr().out


def test_profile_lists_the_largest_ops_per_pass():
    out = main(["--shape", "tiny", "--device", "cpu", "--gen-length", "8", "--prompt-len", "8", "--repeats", "1",
                "--no-baseline", "--batch-sizes", "1,2", "--profile", "40"])
    assert out["batch_scaling_matmul_bound"] == pytest.approx(
        out["ours"]["batch2"]["matmul_bound_tokens_per_s"] / out["ours"]["batch1"]["tokens_per_s"])
    for key in ("batch1", "batch2"):
        assert out["ours"][key]["commit_matmul_only_passes_per_s"] > 0
        prof = out["ours"][key]["profile"]
        assert prof["clock"] == "cpu" and prof["passes"] == out["ours"][key]["nfe"]
        ops = prof["ops"]
        assert 0 < len(ops) <= 40 and all(op["name"] and op["calls_per_pass"] > 0 for op in ops)
        assert [op["ms_per_pass"] for op in ops] == sorted((op["ms_per_pass"] for op in ops), reverse=True)
        assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
        # every pass makes a matmul per weight: the profile must see them among its 40 largest ops
        names = [op["name"] for op in ops]
        assert any(n in ("aten::addmm", "aten::mm", "aten::linear") for n in names), names


def test_profile_of_a_compiled_cpu_step_names_its_fused_kernels():
    """--profile with a compiled runner on a CPU compiles the step with a profiler record per
    inductor kernel, so the profile shows them instead of one opaque graph call; only for the run."""
    from torch._inductor import config

    out = main(["--shape", "tiny", "--device", "cpu", "--gen-length", "8", "--prompt-len", "8", "--repeats", "1",
                "--no-baseline", "--runner", "compiled_static", "--profile", "200"])
    names = [op["name"] for op in out["ours"]["batch1"]["profile"]["ops"]]
    assert any("cpp_fused" in n for n in names), names
    assert config.cpp.enable_kernel_profile is False


def test_cpu_matmul_flag_picks_the_kernel_for_the_run_and_the_limit_is_the_fastest_reader():
    """--cpu-matmul sets the bf16 kernel policy for the run only and the JSON says which kernel the
    decode steps used; the bandwidth limit is the fastest of the ways the script read 1 GiB."""
    from diffcoder import kernels
    flags = ["--shape", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--gen-length", "8", "--prompt-len", "8",
             "--repeats", "1", "--no-baseline"]
    has_amx = kernels.amx_unsupported_reason() is None
    auto = "amx" if has_amx else "avx512" if kernels.avx512_for(4) is not None else "onednn"
    for choice, want in (("onednn", "onednn"), ("auto", auto)):
        out = main([*flags, "--cpu-matmul", choice])
        assert out["cpu_matmul"] == want and kernels.current_policy().matmul == "auto"
        readers = out["bandwidth_readers"]
        assert out["bandwidth_bytes_per_s"] == max(readers.values())
        assert set(readers) == ({"float32 sum", "AMX kernel"} if has_amx else {"float32 sum"})
    float32 = main([*flags[:4], "--dtype", "float32", *flags[6:]])
    assert float32["cpu_matmul"] is None
    native_confidence = kernels.confidence_ops(torch.zeros(1)) is not None  # the AMX or the AVX-512 library's
    assert float32["native_ops"] == (["confidence"] if native_confidence else [])  # native attention: bf16 only


def test_cpu_attention_and_confidence_flags_switch_the_native_ops_for_the_run_only():
    from diffcoder import kernels
    if kernels.amx_unsupported_reason() is not None:
        pytest.skip("the native ops need a CPU with AMX")
    flags = ["--shape", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--gen-length", "8", "--prompt-len", "8",
             "--repeats", "1", "--no-baseline"]
    assert main(flags)["native_ops"] == ["attention", "confidence"]
    assert main([*flags, "--cpu-attention", "torch"])["native_ops"] == ["confidence"]
    assert main([*flags, "--cpu-confidence", "torch", "--cpu-attention", "torch"])["native_ops"] == []
    assert main([*flags, "--confidence-dtype", "float32"])["native_ops"] == ["attention"]
    assert kernels.current_policy().attention == kernels.current_policy().confidence == "auto"
    ab = main([*flags, "--batch-sizes", "1,2", "--ab-torch-ops"])  # each run paired with one on torch's ops
    assert set(ab["ours"]) == {"batch1", "batch2", "batch1_torch_ops", "batch2_torch_ops"}
    assert set(ab["native_ops_speedup"]) == {"batch1", "batch2"} and all(v > 0 for v in ab["native_ops_speedup"].values())
    assert kernels.current_policy().attention == kernels.current_policy().confidence == "auto"


def test_the_skeleton_shape_has_smol_135ms_op_graph_with_next_to_no_weights():
    from diffcoder.config import PRESETS, ModelConfig

    smol, skel = (ModelConfig(mask_token_id=5, **PRESETS[name]) for name in ("smol-135m", "smol-135m-skeleton"))
    assert skel.num_hidden_layers == smol.num_hidden_layers
    assert (skel.num_attention_heads // skel.num_key_value_heads
            == smol.num_attention_heads // smol.num_key_value_heads)  # same folded query rows per KV head
    assert skel.head_dim % 32 == 0 and smol.head_dim % 32 == 0  # both take the native attention op's AMX path
    assert skel.tie_word_embeddings == smol.tie_word_embeddings
    assert skel.num_parameters < smol.num_parameters / 50
    model = random_model("smol-135m-skeleton", torch.bfloat16, torch.device("cpu"))
    # a decode pass's matmuls: fused q/k/v, o, fused gate/up and down per layer, and the vocabulary's
    assert len(decode_matmuls(model.prepare_for_decoding())) == smol.num_hidden_layers * 4 + 1


def test_the_script_prints_json_last():
    """Run as documented (python benchmarks/decode_speed.py), with the baseline: the tokens agree."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--gen-length", "8", "--prompt-len", "8",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["tokens_identical"] is True and summary["ours"]["batch1"]["tokens"] == 8
    assert summary["ours"]["batch1"]["matmul_only_bandwidth_fraction"] > 0
    assert "its matmuls alone (4 rows)" in res.stdout


def test_the_kernel_benchmark_times_every_method_this_cpu_has_and_summarize_tabulates_it(tmp_path):
    """linear_kernels.py --streamed on the small shape, once: a line per (rows, method) with the
    CPU's own kernel among them where it has one, then summarize.py --kernels' table of that file."""
    from diffcoder import kernels

    bench = SCRIPT.with_name("linear_kernels.py")
    res = subprocess.run([sys.executable, str(bench), "--streamed", "--rows", "4", "--repeats", "1", "--fp32"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    methods = {r["method"] for r in lines[:-1]}
    assert {"F.linear bf16", "oneDNN packed for 4 rows", "F.linear fp32 (float32 weights)",
            "read ceiling (float32 sum)"} <= methods
    assert ("AVX-512 kernel (diffcoder)" in methods) == (kernels.avx512_ops() is not None)
    assert lines[-1]["name"] == "linear_kernels_streamed" and lines[-1]["model_shape"] == "smol-135m"
    out = tmp_path / "kernels.txt"
    out.write_text(res.stdout)
    table = subprocess.run([sys.executable, str(SCRIPT.with_name("summarize.py")), "--kernels", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("\n| 4 | ") == len(methods) and "| 4 | oneDNN packed for 4 rows |" in table.stdout


def test_remasking_flag_decodes_leftmost_first_and_is_recorded():
    flags = ["--shape", "tiny", "--device", "cpu", "--gen-length", "8", "--prompt-len", "8", "--repeats", "1",
             "--remasking", "left_to_right"]
    with pytest.raises(SystemExit, match="decodes by confidence only; add --no-baseline"):
        main(flags)
    out = main([*flags, "--no-baseline"])
    assert out["remasking"] == "left_to_right" and out["ours"]["batch1"]["tokens"] == 8
    # The matmul bound times the passes the engine runs: one column per sequence projected, and
    # with shift a commit pass without the noisy block.
    assert (out["ours"]["batch1"]["commit_rows"], out["ours"]["batch1"]["head_rows"]) == (8, 1)
    shifted = main([*flags, "--no-baseline", "--shift", "--batch-sizes", "2"])["ours"]["batch2"]
    assert (shifted["commit_rows"], shifted["head_rows"]) == (8, 2)
    by_confidence = main([*flags[:-2], "--no-baseline", "--shift", "--batch-sizes", "2"])["ours"]["batch2"]
    assert (by_confidence["commit_rows"], by_confidence["head_rows"]) == (16, 8)
