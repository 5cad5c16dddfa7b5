"""The model card of diffcoder-0.5b and docs/replication-0.5b.md, from the files of this folder:

    python runs/diffcoder_05b/report.py

Reads train/stage-N/{metrics.jsonl,run.json,data.json} (the training runs and the data set each
used), DATASET/contamination.json (each data set's n-gram check) and
results/ARM/BENCH/{results,per_problem}.json[l] (evaluate.py); prints the tables and writes them
into the two documents. Nothing here is typed in by hand except the published numbers of other
models, each with its source.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CARD = REPO / "diffcoder" / "weights" / "diffcoder-0.5b" / "MODEL_CARD.md"
DOC = REPO / "docs" / "replication-0.5b.md"
sys.path.insert(0, str(HERE))
from evaluate import ABLATIONS, ARMS, MODEL, runs_on  # noqa: E402

from diffcoder.eval.harness import read_jsonl  # noqa: E402

BENCHES = (("humaneval", "HumanEval"), ("mbpp", "MBPP (sanitized)"), ("humaneval-infill-single", "HE single-line infill"))
# Published pass@1 of other models, their harnesses (not comparable to ours; see the card's text).
PUBLISHED = [
    ("Qwen2.5-Coder-0.5B-Instruct (Qwen's report, arXiv 2409.12186, Table 15)", "61.6", "52.4"),
    ("dllm Tiny-A2D Qwen2.5-Coder-0.5B-Instruct-diffusion-bd3lm-v0.1 (dllm's README)", "41.5", "33.6"),
    ("the same AR base in dllm's harness (dllm's README)", "28.0", "-"),
    ("open-dcoder-0.5B (dllm's README)", "20.8", "35.2"),
]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def cell(arm: str, bench: str) -> tuple[str, dict | None]:
    res = read_json(HERE / "results" / arm / bench / "results.json")
    if not res:
        return "not run", None
    n, k = res["n_problems"], res["n_passed_samples"]
    p = k / n if n else 0.0
    se = math.sqrt(p * (1 - p) / n) if n else 0.0
    return f"{100 * p:.1f} ± {100 * se:.1f} ({k}/{n})", res


def records(arm: str, bench: str, name: str) -> list[dict] | None:
    """results/ARM/BENCH/NAME.jsonl (the harness's records), or None before it ran."""
    f = HERE / "results" / arm / bench / f"{name}.jsonl"
    return read_jsonl(f, what=name + " file") if f.exists() else None


def per_problem(arm: str, bench: str) -> list[dict] | None:
    """The harness's one record per problem (task_id, passed, status, reason), or None before it ran."""
    return records(arm, bench, "per_problem")


def identical_answers(arm: str, ref: str, bench: str) -> str:
    """', the same text as REF on k of n problems': how exactly ARM reproduced REF's answers."""
    def texts(a: str) -> dict[str, str]:
        return {r["task_id"]: r["raw"] for r in records(a, bench, "samples") or []}

    mine, theirs = texts(arm), texts(ref)
    shared = [t for t in mine if t in theirs]
    return f", the same text on {sum(mine[t] == theirs[t] for t in shared)} of {len(shared)} problems" if shared else ""


def syntax_errors(arm: str, bench: str) -> str:
    """How many answers do not even parse: the signature of tokens committed out of order."""
    rows = per_problem(arm, bench)
    if rows is None:
        return "-"
    bad = sum(1 for r in rows if r["status"] == "error"
              and any(kind in (r.get("reason") or "") for kind in ("SyntaxError", "IndentationError")))
    return f"{bad}/{len(rows)}"


def arms_table() -> list[str]:
    head = ("| arm | what | " + " | ".join(name for _, name in BENCHES)
            + " | tokens per pass (HumanEval) | answers that do not parse (HumanEval) |")
    rows = [head, "|" + " --- |" * (len(BENCHES) + 4)]
    for arm, (_, _, what) in ARMS.items():
        if arm in ABLATIONS:
            continue
        cells, tpp = [], "-"
        for bench, _ in BENCHES:
            text, res = cell(arm, bench)
            cells.append(text)
            if bench == "humaneval" and res and "tokens_per_pass" in res:
                tpp = f"{res['tokens_per_pass']:.2f}"
        rows.append(f"| `{arm}` | {what} | " + " | ".join(cells) + f" | {tpp} | {syntax_errors(arm, 'humaneval')} |")
    return rows


SPEED = REPO / "benchmarks" / "results" / "cpu-real-0.5b"
SPEED_RUNS = (("ar_base", "AR base, block length 1"), ("diffcoder_05b", "diffcoder-0.5b, B = 4, one token per pass, leftmost first"),
              ("diffcoder_05b_compiled", "diffcoder-0.5b as above, compiled step (`--runner compiled_static`)"),
              ("diffcoder_05b_onednn", "diffcoder-0.5b as above, every matmul on oneDNN (our kernels' baseline)"))


def speed_results() -> dict[str, dict]:
    """The last (JSON) line of each benchmarks/run_real_05b.sh output."""
    out = {}
    for name, _ in SPEED_RUNS:
        f = SPEED / f"{name}.txt"
        if f.exists():
            out[name] = json.loads(f.read_text().strip().splitlines()[-1])
    return out


def read_limited_fraction(r: dict) -> float:
    """Batch-1 passes/s as a fraction of the fastest read the run measured: the bandwidth probe or
    reading each weight once (on some machines the latter beats the probe, which would then
    overstate the fraction)."""
    b1 = r["ours"]["batch1"]
    limit = max(b1["passes_per_s"] / b1["bandwidth_fraction"], r.get("weight_read_passes_per_s") or 0.0)
    return b1["passes_per_s"] / limit


def speed_table(speed: dict[str, dict]) -> list[str]:
    if not speed:
        return ["Speed: not measured yet (`bash benchmarks/run_real_05b.sh`)."]
    first = next(iter(speed.values()))
    rows = [f"Decode speed (`benchmarks/run_real_05b.sh`, {first['hardware']}, {first['dtype']}, prompt "
            f"{first['prompt_len']} tokens, {first['gen_length']} new; the limit is the fastest read of the run, "
            "its bandwidth probe or reading each weight once; matmuls: `amx` and `avx512` are our CPU kernels "
            "(diffcoder/kernels), `onednn` oneDNN's; raw outputs and the other columns in "
            "`benchmarks/RESULTS.md`):", "",
            "| model | matmuls | batch 1 passes/s | % of the fastest measured read | batch 1 tok/s | batch 8 tok/s "
            "| batch 16 tok/s | batch 16 / batch 1 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, what in SPEED_RUNS:
        r = speed.get(name)
        if not r:
            continue
        b = r["ours"]
        tok = [f"{b[k]['tokens_per_s']:.1f}" if k in b else "-" for k in ("batch1", "batch8", "batch16")]
        scaling = f"{r['batch_scaling']:.2f}x" if "batch_scaling" in r else "-"
        rows.append(f"| {what} | {r.get('cpu_matmul') or '-'} | {b['batch1']['passes_per_s']:.1f} "
                    f"| {100 * read_limited_fraction(r):.0f}% "
                    f"| {' | '.join(tok)} | {scaling} |")
    return rows


SPECULATIVE_SPEED = SPEED / "speculative.txt"


def speculative_speed_table(shipped_sha: str) -> list[str]:
    """benchmarks/speculative_speed.py's run (its last line is JSON), as the table it prints."""
    if not SPECULATIVE_SPEED.exists():
        return []
    sys.path.insert(0, str(REPO / "benchmarks"))
    from speculative_speed import markdown_table

    d = json.loads(SPECULATIVE_SPEED.read_text().strip().splitlines()[-1])
    if d.get("weights_sha256") != shipped_sha:  # tokens per pass are the weights'
        return [f"Speculative decoding against one token per pass: not measured on the shipped weights yet "
                f"(`{SPECULATIVE_SPEED.relative_to(REPO)}` holds a run of other weights; "
                "`bash benchmarks/run_real_05b.sh` measures it)."]
    return [f"Speculative decoding against one token per pass, same model and prompts in one run "
            f"(`benchmarks/speculative_speed.py`, {d['hardware']}, {d['dtype']}, {d['remasking']}, the first "
            f"HumanEval prompts in the instruct format, {d['gen_length']} new tokens each, no early stop):", "",
            *markdown_table(d)]


def pending_note() -> list[str]:
    """The shipped model's arms x benchmarks with no result yet (the table's `not run`): each
    stage's weights are evaluated anew, arm by arm."""
    missing = []
    for arm, (model, _, _) in ARMS.items():
        benches = [name for bench, name in BENCHES if runs_on(arm, bench) and cell(arm, bench)[1] is None]
        if model == MODEL and benches:
            missing.append(f"`{arm}` ({', '.join(benches)})")
    if not missing:
        return []
    return [f"- Not evaluated on the shipped weights yet: {'; '.join(missing)} "
            "(`python runs/diffcoder_05b/evaluate.py --arms ARM --bench BENCH`, with `--limit` as noted below)."]


def subset_notes() -> list[str]:
    notes = []
    for bench, name in BENCHES:
        sizes = {res["n_problems"] for arm in ARMS if (res := read_json(HERE / "results" / arm / bench / "results.json"))}
        full = {"humaneval": 164, "mbpp": 427, "humaneval-infill-single": 1033}.get(bench)
        if full and sizes and max(sizes) < full:
            notes.append(f"- {name}: the first {max(sizes)} of its {full} problems (file order), a fixed subset "
                         "chosen to fit the CPU budget (`evaluate.py --limit`).")
    return pending_note() + notes + dtype_notes()


def dtype_notes() -> list[str]:
    """Which arms decoded in a dtype other than most (each result folder's generation.json)."""
    dtypes: dict[str, set[str]] = {}
    for arm in ARMS:
        for bench, _ in BENCHES:
            gen = read_json(HERE / "results" / arm / bench / "generation.json")
            if gen and "dtype" in gen:
                dtypes.setdefault(gen["dtype"].removeprefix("torch."), set()).add(arm)
    if len(dtypes) < 2:
        return []
    common = max(dtypes, key=lambda d: len(dtypes[d]))
    others = "; ".join(f"{d}: {', '.join(f'`{a}`' for a in sorted(arms))}" for d, arms in sorted(dtypes.items())
                       if d != common)
    return [f"- Weights and activations in {common}, except {others} (`--dtype auto` on the machine that ran them)."]


def pass_rate(arm: str, bench: str) -> float | None:
    res = read_json(HERE / "results" / arm / bench / "results.json")
    return res["n_passed_samples"] / res["n_problems"] if res and res["n_problems"] else None


# results/ARM-rerun/BENCH: ARM decoded again as its speculative arm was (same machine and dtype), the
# first problems only, with evaluate.py's flags for ARM into that folder (`diffcoder eval humaneval
# --model diffcoder-0.5b --out results/bd4-l2r-rerun/humaneval --limit 32 ...`): its texts against the
# speculative arm's separate the method from the arithmetic of two runs (machine, dtype).
# One token per pass, by in-block order: the release's and the one diffcoder-0.5b ships with (release.py).
ONE_PER_PASS = {"bd4": "most confident position first (the release's order)",
                "bd4-l2r": "leftmost masked position first (the shipped default)"}


def budget(stages: list[dict]) -> str:
    return f"{len(stages)} stages, {sum(t['tokens'] for t in stages) / 1e6:.2f} M tokens"


def targets(speed: dict[str, dict], stages: list[dict], ar_stages: list[dict]) -> list[str]:
    """The issue's targets, each with the measured value and whether it holds."""
    out = []
    ar, ar_sft = pass_rate("ar-base", "humaneval"), pass_rate("ar-sft", "humaneval")
    one = {arm: pass_rate(arm, "humaneval") for arm in ONE_PER_PASS}
    for arm, order in ONE_PER_PASS.items():
        bd = one[arm]
        if ar and bd is not None:
            out.append(f"- B = 4, one token per pass, {order} (`{arm}`), at least 80% of the AR base's HumanEval: "
                       f"{100 * bd:.1f} vs {100 * ar:.1f} = {100 * bd / ar:.0f}% "
                       f"({'met' if bd >= 0.8 * ar else 'not met'}; the paper's claim, at least equal: "
                       f"{'met' if bd >= ar else 'not met'}).")
    if ar_sft and all(v is not None for v in one.values()):
        same = [t["data_set"] for t in stages] == [t["data_set"] for t in ar_stages]
        budgets = ("the same data and budget" if same else
                   f"block diffusion {budget(stages)}, AR SFT {budget(ar_stages)}")
        best = max(one.values())
        versus = ", ".join(f"`{arm}` {100 * v:.1f}" for arm, v in one.items())
        out.append(f"- The paper's comparison proper, from the same checkpoint ({budgets}): block diffusion ({versus}) "
                   f"vs AR SFT (`ar-sft`) {100 * ar_sft:.1f} on HumanEval, the better order "
                   f"{100 * (best - ar_sft):+.1f} points ({'at least equal: the claim holds here' if best >= ar_sft else 'the claim does not hold at this budget'}).")
    for arm in ("bd4-t0.9", "bd4-t0.7", "bd4-l2r-t0.9", "bd4-pipe", "bd4-l2r-spec"):
        base = "bd4-l2r" if "left_to_right" in ARMS[arm][1] else "bd4"  # one token per pass, same order
        res, p, bd = read_json(HERE / "results" / arm / "humaneval" / "results.json"), pass_rate(arm, "humaneval"), one[base]
        if res and p is not None and bd is not None and "tokens_per_pass" in res:
            tpp, loss = res["tokens_per_pass"], 100 * (bd - p)
            ok = tpp >= 1.5 and loss <= 5
            change = f"{loss:.1f} points below" if loss >= 0 else f"{-loss:.1f} points above"
            same = ""
            if "--speculative" in ARMS[arm][1]:
                same = identical_answers(arm, base, "humaneval")
                rerun = identical_answers(arm, f"{base}-rerun", "humaneval")
                if rerun:  # one token per pass decoded again as ARM was (results/ARM-rerun)
                    same += (f"; `{base}` decoded again as `{arm}` was (machine and dtype){rerun} (against the "
                             f"stored `{base}`{identical_answers(f'{base}-rerun', base, 'humaneval')})")
            out.append(f"- `{arm}`: {tpp:.2f} tokens per pass, HumanEval {change} one token per pass in the same "
                       f"order (`{base}`{same}; target: at least 1.5 tokens per pass and at most 5 points below: "
                       f"{'met' if ok else 'not met'}).")
    if "diffcoder_05b" in speed:
        r = speed["diffcoder_05b"]
        frac, scale = read_limited_fraction(r), r["batch_scaling"]
        b1 = r["ours"]["batch1"]
        matmul_frac = frac * b1["matmul_only_passes_per_s"] / b1["passes_per_s"]
        ar = speed.get("ar_base")
        ar_note = (f"; the AR base {100 * read_limited_fraction(ar):.0f}% and {ar['batch_scaling']:.2f}x"
                   if ar else "")
        compiled = speed.get("diffcoder_05b_compiled")
        best = max(frac, read_limited_fraction(compiled)) if compiled else frac
        compiled_note = (f"; {100 * read_limited_fraction(compiled):.0f}% with the compiled step" if compiled else "")
        out.append(f"- CPU decode of diffcoder-0.5b at batch 1 ({r.get('cpu_matmul') or 'torch'} matmuls): "
                   f"{100 * frac:.0f}% of the fastest measured read with the default eager step{compiled_note} "
                   f"(target 60%: {'met' if best >= 0.6 else 'not met'}; the eager pass's matmuls alone reach "
                   f"{100 * matmul_frac:.0f}%); batch 16 / batch 1 tokens/s "
                   f"{scale:.2f}x (target 8x: {'met' if scale >= 8 else 'not met'}; at most "
                   f"{r['batch_scaling_matmul_bound']:.2f}x if batch 16's passes took only their matmuls' time: at one "
                   f"token per pass every pass computes all {r['block_length']} positions of each row's block, so "
                   f"batch 16 is bound by compute here){ar_note}.")
    return out


def training_run(folder: Path) -> dict:
    """One training run's facts, from the metrics.jsonl, run.json and data.json that release.py or
    the arm's script copied into `folder`."""
    recs = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    run = read_json(folder / "run.json") or {}
    wall = sum(r["step_time_s"] for r in recs)
    last = recs[-10:]
    data = read_json(folder / "data.json")
    return {"name": folder.name, "steps": recs[-1]["step"], "tokens": recs[-1]["tokens"],
            "wall_h": wall / 3600, "tok_s": recs[-1]["tokens"] / wall,
            "loss_last10": sum(r["loss"] for r in last) / len(last), "rank": run.get("lora_rank"),
            "alpha": run.get("lora_alpha"), "lr": run.get("lr"), "min_lr": run.get("min_lr"),
            "seq_len": run.get("seq_len"), "batch": run.get("batch_size"), "seed": run.get("seed"),
            "objective": run.get("objective"), "resumed": bool(run.get("adapter")), "bf16": run.get("bf16"),
            "data_set": data["data_set"] if data else None}


def training_stages(folder: Path) -> list[dict]:
    """One entry per training run (folder/stage-N/), in order; each later stage starts from the
    adapter the one before it made."""
    return [training_run(stage) for stage in sorted(folder.glob("stage-*"), key=lambda p: int(p.name.split("-")[1]))]


def paired_difference(arm: str, ref: str, bench: str) -> tuple[float, float] | None:
    """pass@1 of `arm` minus `ref` on the same problems, in points, with the standard error of the
    paired difference (both arms answer every problem, so per-problem differences are what vary)."""
    rows = {}
    for name in (arm, ref):
        if (records := per_problem(name, bench)) is None:
            return None
        rows[name] = {r["task_id"]: float(r["passed"]) for r in records}
    tasks = sorted(rows[arm].keys() & rows[ref].keys())
    if not tasks:
        return None
    d = [rows[arm][t] - rows[ref][t] for t in tasks]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / len(d))


ABLATION_REF = "s1"


def ablation_table() -> list[str]:
    """Stage 1 with one setting changed (train_ablations.sh), each against stage 1 itself; a
    benchmark gets columns once the reference and one ablation have results on it."""
    rows = []
    others = [arm for arm in ABLATIONS if arm != ABLATION_REF]
    benches = [(bench, name) for bench, name in BENCHES[:2] if pass_rate(ABLATION_REF, bench) is not None
               and any(pass_rate(arm, bench) is not None for arm in others)]
    for arm, sub in ABLATIONS.items():
        folder = HERE / "train" / ("stage-1" if arm == ABLATION_REF else f"ablation/{sub}")
        if pass_rate(arm, "humaneval") is None or not (folder / "metrics.jsonl").exists():
            continue
        cells = []
        for bench, _ in benches:
            diff = paired_difference(arm, ABLATION_REF, bench) if arm != ABLATION_REF else None
            cells += [cell(arm, bench)[0], f"{diff[0]:+.1f} ± {diff[1]:.1f}" if diff else "-"]
        t = training_run(folder)
        rows.append(f"| `{arm}` | {ARMS[arm][2]} | {' | '.join(cells)} | {syntax_errors(arm, 'humaneval')} "
                    f"| {t['steps']}, {t['tokens'] / 1e6:.2f} M | {t['lr']:g} | {t['wall_h']:.2f} h "
                    f"({t['tok_s']:.0f} tokens/s) | {t['loss_last10']:.3f} |")
    if len(rows) < 2:
        return []
    heads = " | ".join(f"{name} | vs `{ABLATION_REF}` (points)" for _, name in benches)
    return [f"Ablations (`train_ablations.sh`): stage 1 (from the AR base, data set `data/`, `sft.toml`, data-order "
            "seed 0) with one setting changed, at the same steps and tokens; decoded as `bd4-l2r` (B = 4, one token "
            f"per pass, leftmost masked position first); each difference against `{ABLATION_REF}` is paired by "
            "problem (± its standard error):", "",
            f"| arm | what | {heads} | answers that do not parse (HumanEval) | optimizer steps, tokens | peak lr "
            "| optimizer time on 2 CPU cores | mean loss, last 10 steps |",
            "|" + " --- |" * (7 + 2 * len(benches)), *rows]


LOSS = {"sft": "masked answer tokens", "ar": "answer tokens"}
LOSS_NAME = {"sft": f"block-diffusion loss: {LOSS['sft']}, weighted 1/u after the corruption warmup",
             "ar": f"next-token loss on {LOSS['ar']}"}


# run.json's "bf16": the trainer's resolved precision (bf16 autocast where the CPU runs bf16 natively).
PRECISION = {True: "bfloat16 autocast", False: "float32", None: "an unrecorded precision"}


def stage_line(t: dict, label: str = "Training") -> str:
    start = "from the previous stage's adapter, " if t["resumed"] else "from the AR base, "
    return (f"- {label} {t['name']}: {start}on data set `{t['data_set']}/`, {t['steps']} optimizer steps, "
            f"{t['tokens'] / 1e6:.2f} M tokens (prompt and answer, packed rows of {t['seq_len']}; the loss is on {LOSS[t['objective']]} only), peak lr "
            f"{t['lr']:g} (cosine to {t['min_lr']:g}), data-order seed {t['seed']}, {t['wall_h']:.2f} h of optimizer "
            f"steps on 2 CPU cores in {PRECISION[t['bf16']]} ({t['tok_s']:.0f} tokens/s); mean loss of the last 10 steps {t['loss_last10']:.3f} "
            f"({LOSS_NAME[t['objective']]}).")


def data_sets(stages: list[dict]) -> list[str]:
    return sorted({t["data_set"] for t in stages}, key=lambda name: (len(name), name))


def data_line(name: str) -> str:
    d = read_json(HERE / name / "contamination.json")["summary"]
    check = (f"the contamination check (any shared {d['ngram_words']}-word n-gram with HumanEval, MBPP sanitized "
             "or MBPP full: prompt, solution or tests)")
    line = f"- Data set `{name}/`: {d['chats']} self-distilled chats; {d['dropped']} dropped by {check}, {d['kept']} kept."
    if "fim" in d:
        f = d["fim"]
        line += (f" Plus {f['samples']} fill-in-the-middle samples cut from standard-library functions "
                 f"(`make_data.py --fim`); {f['dropped']} dropped by the same check, {f['kept']} kept.")
    return line


def adapter_facts() -> dict:
    from safetensors import safe_open

    folder = CARD.parent
    f = folder / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as fh:
        params = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return {"bytes": f.stat().st_size, "params": params, "sha": json.loads((folder / "result.json").read_text())["sha256"]}


def stale_results(shipped_sha: str) -> list[str]:
    """results/ARM/BENCH folders of diffcoder-0.5b whose samples other weights made (an earlier
    stage's): the card states numbers of the shipped files only."""
    stale = []
    for gen in sorted((HERE / "results").glob("*/*/generation.json")):
        rec = json.loads(gen.read_text())
        if rec.get("model") == MODEL and rec.get("weights_sha256") != shipped_sha:
            stale.append(f"{gen.parent.relative_to(HERE)} (weights {rec.get('weights_sha256') or 'not recorded'})")
    return stale


START, END = "<!-- generated: runs/diffcoder_05b/report.py -->", "<!-- end generated -->"


def generated_section(path: Path) -> str:
    """The part of a document between the markers (what `main` writes)."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: missing the generated-section markers")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def generated_block() -> str:
    """The generated section of the model card and of docs/replication-0.5b.md."""
    stages = training_stages(HERE / "train")
    if not stages:
        raise SystemExit(f"{HERE / 'train'}: no stage-N folders (release.py writes them)")
    t = stages[-1]
    ar_stages = training_stages(HERE / "train" / "ar-sft")
    a = adapter_facts()
    if stale := stale_results(a["sha"]):
        raise SystemExit(f"evaluated on other weights than the shipped diffcoder-0.5b (sha256 {a['sha']}): "
                         f"{'; '.join(stale)}. Move each folder away and run evaluate.py again for it "
                         "(--arms ARM --bench BENCH).")
    table = arms_table()
    published = ["| model (their harness) | HumanEval | MBPP |", "| --- | --- | --- |",
                 *[f"| {m} | {h} | {p} |" for m, h, p in PUBLISHED]]
    facts = [
        *map(stage_line, stages),
        *(stage_line(a, "AR-SFT arm (`train_ar_sft.sh`, weights not shipped)") for a in ar_stages),
        f"- Adapter: LoRA rank {t['rank']}, alpha {t['alpha']:g}, on every linear layer of all 24 blocks, plus the mask "
        f"token's input embedding; {a['params'] / 1e6:.2f} M parameters, {a['bytes'] / 1e6:.1f} MB in bfloat16.",
        *map(data_line, data_sets(stages + ar_stages)),
        f"- Merged weights (`diffcoder pull diffcoder-0.5b`): sha256 `{a['sha']}`.",
    ]
    speed = speed_results()
    goals = targets(speed, stages, ar_stages)
    sections = [facts, table, subset_notes(), ablation_table(), speed_table(speed), speculative_speed_table(a["sha"]),
                ["Targets:", "", *goals] if goals else [],
                ["Published numbers, other harnesses (for orientation only):", "", *published]]
    return "\n\n".join("\n".join(part) for part in sections if part)


def main() -> int:
    block = generated_block()
    print(block)
    for path in (CARD, DOC):
        generated_section(path)  # the markers are there
        head, rest = path.read_text().split(START, 1)
        path.write_text(head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
