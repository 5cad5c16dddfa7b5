"""The engine against the release-rule oracle, batching, shift/AR, streaming and errors."""
from __future__ import annotations

import random

import pytest
import torch

import diffcoder
from diffcoder.engine.decoding import BlockEvent, Decoding, StepEvent
from diffcoder.engine.release import release_generate
from diffcoder.engine.runners import EagerRunner
from diffcoder.engine.rules import block_schedule
from diffcoder.model import DiffCoderLM
from diffcoder.defaults import default_model_dir
from helpers import EOS, MASK, V, cases, decode_model, hf_twin, oracle_generate, rand_prompt



class Biased(DiffCoderLM):
    """A model whose logits favour one token everywhere (drives EOS and mask-token cases)."""
    favour: int = EOS

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        logits[..., self.favour] += 100.0
        return logits


def biased(token: int, seed: int = 1) -> DiffCoderLM:
    model = decode_model(seed)
    model.__class__ = Biased
    model.favour = token
    return model


@pytest.fixture(scope="module")
def pair():
    model = decode_model()
    return model, hf_twin(model)


@pytest.mark.parametrize("case", cases(48), ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}-S{c['steps']}"
                         f"-P{len(c['prompt'])}-t{c['threshold']}-sh{int(c['shift'])}-e{c['eos_id']}")
def test_matches_release_oracle(pair, case):
    model, hf = pair
    prompt = case.pop("prompt")
    want, release_nfe = oracle_generate(hf, prompt, mask_id=MASK, **case)
    got = diffcoder.generate(model, [prompt], **case)
    assert got.tokens[0] == want
    assert MASK not in got.tokens[0]
    assert got.nfe < release_nfe  # the fused commit pass saves one forward per block (and the prefill)


@pytest.mark.parametrize("case", cases(16, seed=1), ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}"
                         f"-S{c['steps']}-P{len(c['prompt'])}-t{c['threshold']}-sh{int(c['shift'])}-e{c['eos_id']}")
def test_left_to_right_matches_its_oracle(pair, case):
    """remasking="left_to_right": the allotment goes to the leftmost masked positions; with a
    threshold, the leftmost plus the unbroken run after it at or above the threshold."""
    model, hf = pair
    prompt = case.pop("prompt")
    want, _ = oracle_generate(hf, prompt, mask_id=MASK, left_to_right=True, **case)
    assert diffcoder.generate(model, [prompt], remasking="left_to_right", **case).tokens[0] == want


def test_left_to_right_commits_in_place_order(pair):
    model, _ = pair
    dec = Decoding(model, [[9, 10, 11, 12, 13]], steps=8, gen_length=8, block_length=4, step_events=True,
                   remasking="left_to_right")
    order = [p for e in dec if isinstance(e, StepEvent) for p in e.positions]
    assert order == list(range(8))


@pytest.mark.slow
def test_eos_cases_are_exercised(pair):
    """The random cases above must really contain early stops, or the EOS rule is untested."""
    model, _ = pair
    stops = 0
    for case in cases(48):
        if case["eos_id"] is None:
            continue
        prompt = case.pop("prompt")
        res = diffcoder.generate(model, [prompt], **case)
        stops += res.finish_reasons[0] == "stop"
    assert stops >= 3


@pytest.mark.slow
def test_batched_equals_single(pair):
    model, _ = pair
    rng = random.Random(7)
    prompts = [rand_prompt(rng, n) for n in (1, 3, 4, 9, 14, 6, 2)]
    for kw in (dict(steps=16, gen_length=16, block_length=4), dict(steps=8, gen_length=16, block_length=4,
                                                                  threshold=0.5),
               dict(steps=12, gen_length=12, block_length=2, shift=True)):
        batched = diffcoder.generate(model, prompts, eos_id=EOS, **kw)
        for p, toks, reason in zip(prompts, batched.tokens, batched.finish_reasons):
            alone = diffcoder.generate(model, [p], eos_id=EOS, **kw)
            assert toks == alone.tokens[0]
            assert reason == alone.finish_reasons[0]


def test_finished_rows_leave_the_batch():
    """A row that hits EOS stops costing compute: the batch shrinks at the block boundary."""
    model = biased(EOS)
    dec = Decoding(model, [[7, 8, 9], [10, 11]], steps=32, gen_length=32, block_length=4, eos_id=EOS)
    list(dec)
    assert dec.result.finish_reasons == ["stop", "stop"]
    assert dec.result.nfe <= 4  # one block each, not eight


def test_ar_equivalence_with_transformers_greedy(pair):
    """An AR checkpoint decoded with block_length=1, shift=True, steps=gen_length = greedy AR."""
    model, hf = pair
    rng = random.Random(3)
    for n in (1, 5, 11):
        prompt = rand_prompt(rng, n)
        G = 20
        ours = diffcoder.generate(model, [prompt], steps=G, gen_length=G, block_length=1, shift=True)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=G, do_sample=False, suppress_tokens=[MASK],
                          eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, n, dtype=torch.long))
        assert ours.tokens[0] == ref[0, n:].tolist()
        assert ours.nfe == G


def test_mask_token_is_never_chosen():
    """With the mask id as the argmax everywhere, the release never finishes a block; we must."""
    model = biased(MASK)
    res = diffcoder.generate(model, [[7, 8, 9]], steps=8, gen_length=8, block_length=4)
    assert len(res.tokens[0]) == 8 and MASK not in res.tokens[0]


def test_threshold_with_few_steps_still_finishes(pair):
    """threshold with s < B: the release could leave masks and crash; we decode every block fully."""
    model, _ = pair
    res = diffcoder.generate(model, [[3, 4, 6]], steps=2, gen_length=16, block_length=8, threshold=0.99)
    assert len(res.tokens[0]) == 16 and MASK not in res.tokens[0]


def test_fused_commit_nfe():
    """Forward passes per block with the fused commit = steps per block (the release spends +1)."""
    model = decode_model(seed=5)
    res = diffcoder.generate(model, [[3] * 8], steps=32, gen_length=32, block_length=4)
    assert res.nfe == 32


def test_block_schedule():
    assert block_schedule(4, 4) == [1, 1, 1, 1]
    assert block_schedule(3, 2) == [2, 1]
    assert block_schedule(2, 4) == [1, 1]
    assert block_schedule(4, 1) == [4]


def test_block_schedule_costs_the_block_not_the_steps():
    """The release's allotment (steps_per_block steps, `masked` tokens spread over them, empty
    steps skipped), built in O(masked): a huge step count is as cheap as a small one."""
    def allotment(masked: int, spb: int) -> list[int]:
        base, extra = divmod(masked, spb)
        return [k for k in (base + (1 if j < extra else 0) for j in range(spb)) if k > 0]

    for masked in range(0, 40):
        for spb in range(1, 50):
            assert block_schedule(masked, spb) == allotment(masked, spb), (masked, spb)
    import signal

    def expire(*_):
        raise TimeoutError("block_schedule looped over the steps")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        assert block_schedule(4, 100_000_000_000) == [1, 1, 1, 1]
        assert block_schedule(0, 10 ** 18) == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_streaming_events(pair):
    model, _ = pair
    dec = Decoding(model, [[9, 10, 11, 12, 13], [14]], steps=8, gen_length=8, block_length=4, step_events=True)
    events = list(dec)
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    steps = [e for e in events if isinstance(e, StepEvent)]
    for row in (0, 1):
        toks = [t for e in blocks if e.row == row for t in e.tokens]
        assert toks == dec.result.tokens[row]
        starts = [e.start for e in blocks if e.row == row]
        assert starts == sorted(starts)
        committed = sorted(p for e in steps if e.row == row for p in e.positions)
        assert committed == list(range(8))  # every generated position committed exactly once
        assert all(0.0 <= c <= 1.0 for e in steps if e.row == row for c in e.confidences)
    assert blocks[-1].finished


def test_cancel_stops_a_row(pair):
    model, _ = pair
    dec = Decoding(model, [[9, 10], [11, 12]], steps=16, gen_length=16, block_length=4)
    for ev in dec:
        if isinstance(ev, BlockEvent) and ev.row == 1:
            dec.cancel(1)
    assert dec.result.finish_reasons[1] == "cancelled"
    assert len(dec.result.tokens[1]) < 16 and len(dec.result.tokens[0]) == 16


def test_temperature_is_reproducible_with_seed(pair):
    model, _ = pair
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=1.0)
    a = diffcoder.generate(model, [[4, 6, 7]], seed=11, **kw)
    b = diffcoder.generate(model, [[4, 6, 7]], seed=11, **kw)
    runs = {tuple(diffcoder.generate(model, [[4, 6, 7]], seed=s, **kw).tokens[0]) for s in range(6)}
    assert a.tokens == b.tokens and len(runs) > 1
    r = diffcoder.generate(model, [[4, 6, 7]], seed=3, remasking="random", **{**kw, "temperature": 0.0})
    assert r.tokens == diffcoder.generate(model, [[4, 6, 7]], seed=3, remasking="random",
                                          **{**kw, "temperature": 0.0}).tokens


def test_release_style_generate_output(pair):
    model, _ = pair
    ids = torch.tensor([[9, 10, 11, 12, 13]])
    out = release_generate(model, ids, steps=8, gen_length=8, block_length=4, temperature=0.0,
                           remasking="low_confidence", tokenizer=None, shift=False, threshold=None, eos_id=None)
    assert out.shape == (1, 13) and torch.equal(out[0, :5], ids[0])
    res = diffcoder.generate(model, [ids[0].tolist()], steps=8, gen_length=8, block_length=4)
    assert out[0, 5:].tolist() == res.tokens[0]


def test_release_style_output_eos_fill():
    model = biased(EOS)
    out = release_generate(model, torch.tensor([[7, 8, 9, 10, 11]]), steps=16, gen_length=16, block_length=4,
                           eos_id=EOS)
    # prompt 5 tokens -> first block is columns 4..8; EOS inside it: cut at the block end (8), EOS-filled
    assert out.shape == (1, 8) and out[0, 5:].tolist() == [EOS] * 3


BAD = [
    (dict(gen_length=10, block_length=4, steps=10), "multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "steps"),
    (dict(gen_length=8, block_length=4, steps=0), "steps"),
    (dict(gen_length=0, block_length=4, steps=4), "gen_length"),
    (dict(gen_length=8, block_length=0, steps=4), "block_length"),
    (dict(gen_length=8, steps=8, remasking="top"), "remasking"),
    (dict(gen_length=8, steps=8, threshold=0.0), "threshold"),
    (dict(gen_length=8, steps=8, threshold=1.5), "threshold"),
    (dict(gen_length=8, steps=8, temperature=-1.0), "temperature"),
    (dict(gen_length=128, steps=128), "context"),
    (dict(gen_length=8, steps=8, eos_id=V + 3), "eos_id"),
    (dict(gen_length=8, steps=8, max_active_blocks=2), "give a threshold"),
    (dict(gen_length=8, steps=8, max_active_blocks=0), "max_active_blocks"),
    (dict(gen_length=8, steps=8, max_active_blocks=2, threshold=0.5, block_add_threshold=0.0), "block_add"),
    (dict(gen_length=8, steps=8, max_active_blocks=2, threshold=0.5, remasking="left_to_right"), "pipelining"),
    (dict(gen_length=8, steps=8, speculative=True, threshold=0.5), "no threshold"),
    (dict(gen_length=8, steps=4, speculative=True), "steps >= gen_length"),
    (dict(gen_length=8, steps=8, speculative=True, temperature=0.5), "temperature 0"),
    (dict(gen_length=8, steps=8, speculative=True, remasking="random"), "temperature 0"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments(pair, kw, match):
    model, _ = pair
    with pytest.raises(ValueError, match=match):
        diffcoder.generate(model, [[3, 4, 6]], **kw)


@pytest.mark.parametrize("prompts,match", [([[]], "empty"), ([], "non-empty"), ([[3, V]], "vocabulary"),
                                           ([["a"]], "integer")])
def test_bad_prompts(pair, prompts, match):
    model, _ = pair
    with pytest.raises(ValueError, match=match):
        diffcoder.generate(model, prompts, steps=8, gen_length=8)


def test_no_mask_id_is_an_error():
    model = decode_model()
    model.mask_id = None
    with pytest.raises(ValueError, match="mask"):
        diffcoder.generate(model, [[3]], steps=4, gen_length=4)


@pytest.mark.parametrize("case", cases(12, seed=5), ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}"
                         f"-S{c['steps']}-t{c['threshold']}-sh{int(c['shift'])}")
def test_static_shape_runner_matches_eager(pair, case):
    """The static-shape pass (what CUDA graphs replay) decodes exactly what the eager pass does."""
    model, _ = pair
    rng = random.Random(len(case["prompt"]))
    prompts = [case.pop("prompt")] + [rand_prompt(rng, n) for n in (2, 9)]
    eager = diffcoder.generate(model, prompts, runner="eager", **case)
    static = diffcoder.generate(model, prompts, runner="static", **case)
    assert static.tokens == eager.tokens and static.nfe == eager.nfe


@pytest.mark.slow
def test_compiled_runner_matches_eager(pair):
    """`runner="compiled_static"` (inductor; on a CPU with the decoding rule traced into the step)
    decodes exactly what the eager pass does, for the k-per-step and the threshold rules, with a row
    leaving the batch at EOS (a new batch shape) in the first."""
    model, _ = pair
    prompts = [[30, 33, 44, 43, 46, 60], [7, 22, 41, 9, 33, 39, 42]]  # row 0 stops in its first block
    for kw in (dict(steps=12, gen_length=12), dict(steps=6, gen_length=12, threshold=0.5)):
        eager = diffcoder.generate(model, prompts, runner="eager", eos_id=EOS, block_length=4, **kw)
        dec = Decoding(model, prompts, runner="compiled_static", eos_id=EOS, block_length=4, **kw)
        list(dec)
        assert dec._fused_choice is not None  # the rule really ran inside the compiled step
        assert dec.result.tokens == eager.tokens and dec.result.nfe == eager.nfe
        assert dec.result.finish_reasons == eager.finish_reasons
        if "threshold" not in kw:
            assert eager.finish_reasons == ["stop", "length"]  # the batch did shrink
    # Another length in the same cache bucket reuses the compiled graphs: no new compile.
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    longer = [p + [12, 13, 14, 15, 16] for p in prompts]
    kw = dict(steps=12, gen_length=12, block_length=4, eos_id=EOS)  # the first rule: batch 2 and 1 compiled
    eager = diffcoder.generate(model, longer, runner="eager", **kw)
    compiled = diffcoder.generate(model, longer, runner="compiled_static", **kw)
    assert compiled.tokens == eager.tokens and compiled.nfe == eager.nfe
    assert counters["stats"]["unique_graphs"] == graphs


def test_unknown_runner(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="runner"):
        diffcoder.generate(model, [[3]], steps=4, gen_length=4, runner="turbo")
    with pytest.raises(ValueError, match="CUDA"):
        diffcoder.generate(model, [[3]], steps=4, gen_length=4, runner="cuda_graph")


# ------------------------------------------------------------- multi-block pipelining
PIPE_CASES = [c for c in cases(40, seed=9) if c["threshold"] is not None]


@pytest.mark.parametrize("case", PIPE_CASES, ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}-t{c['threshold']}")
def test_pipelining_with_add_threshold_one_is_plain_threshold_decoding(pair, case):
    """A block is only added once the newest one is complete, i.e. never early: the pipelined loop
    must then decode exactly what the one-block engine does (same tokens, same passes)."""
    model, _ = pair
    rng = random.Random(len(case["prompt"]))
    prompts = [case.pop("prompt")] + [rand_prompt(rng, n) for n in (3, 8)]
    plain = diffcoder.generate(model, prompts, **case)
    piped = diffcoder.generate(model, prompts, max_active_blocks=3, block_add_threshold=1.0, **case)
    assert piped.tokens == plain.tokens and piped.nfe == plain.nfe


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("eos", [None, EOS])
def test_pipelining_overlaps_blocks_and_finishes(pair, eos, shift):
    """With shift, a later block's first position reads its logits from the last (possibly still
    masked) column of the block before it, inside the same pass."""
    model, _ = pair
    prompts = [[3, 4, 6], [7, 8, 9, 10, 11, 12, 13]]
    kw = dict(steps=32, gen_length=32, block_length=4, threshold=0.3, eos_id=eos, shift=shift)
    dec = Decoding(model, prompts, step_events=True, max_active_blocks=3, block_add_threshold=0.25, **kw)
    events = list(dec)
    res = dec.result
    for row, toks in enumerate(res.tokens):
        assert MASK not in toks
        assert len(toks) == 32 or (eos is not None and toks[-1] == eos)
        # Streamed block events reassemble the result, in order.
        assert sum((e.tokens for e in events if isinstance(e, BlockEvent) and e.row == row), []) == toks
    # Some block received commits before the block before it was final.
    final_at = {}
    early = False
    for i, e in enumerate(events):
        if isinstance(e, BlockEvent):
            final_at.setdefault((e.row, e.block_index), i)
        elif (e.row, e.block_index - 1) not in final_at and e.block_index > 0:
            early = True
    assert early
    plain = diffcoder.generate(model, prompts, **kw)
    assert res.nfe < plain.nfe
    static = diffcoder.generate(model, prompts, runner="static", max_active_blocks=3, block_add_threshold=0.25, **kw)
    assert static.tokens == res.tokens and static.nfe == res.nfe  # the static-shape pass (CUDA graphs) too


# ------------------------------------------------------------------ speculative (exact)
SPEC_CASES = [dict(c, steps=c["gen_length"], threshold=None) for c in cases(24, seed=2)]


@pytest.mark.parametrize("remasking", ["low_confidence", "left_to_right"])
@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}"
                         f"-P{len(c['prompt'])}-sh{int(c['shift'])}-e{c['eos_id']}")
def test_speculative_matches_the_oracle(pair, case, remasking):
    """The drafts verified in copies give exactly the tokens of one token per pass."""
    model, hf = pair
    case = dict(case)
    prompt = case.pop("prompt")
    want, _ = oracle_generate(hf, prompt, mask_id=MASK, left_to_right=remasking == "left_to_right", **case)
    got = diffcoder.generate(model, [prompt], remasking=remasking, speculative=True, **case)
    assert got.tokens[0] == want


@pytest.mark.parametrize("remasking", ["low_confidence", "left_to_right"])
def test_speculative_batch_commits_several_tokens_per_pass(remasking):
    """Rows of different lengths, EOS and shift, in one batch: the tokens and finish reasons of
    one token per pass, in fewer passes, with passes that commit more than one token. The model
    is the trained tiny one: a random model's drafts would almost never hold."""
    model = diffcoder.load(default_model_dir(), dtype="float32")
    tok = model.tokenizer
    prompts = [tok.encode(t) for t in ("def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self",
                                        "for i in range(10):\n")]
    for shift in (False, True):
        kw = dict(steps=32, gen_length=32, block_length=4, eos_id=tok.eos_id, remasking=remasking, shift=shift)
        plain = diffcoder.generate(model, prompts, **kw)
        dec = Decoding(model, prompts, step_events=True, speculative=True, **kw)
        events = list(dec)
        assert dec.result.tokens == plain.tokens
        assert dec.result.finish_reasons == plain.finish_reasons
        assert dec.result.nfe < plain.nfe
        steps = [e for e in events if isinstance(e, StepEvent)]
        assert max(len(e.positions) for e in steps) > 1
        for row, toks in enumerate(dec.result.tokens):  # each position committed once, streamed in order
            committed = sorted(p for e in steps if e.row == row for p in e.positions)
            assert committed[:len(toks)] == list(range(len(toks)))
            assert sum((e.tokens for e in events if isinstance(e, BlockEvent) and e.row == row), []) == toks


@pytest.mark.parametrize("shift", [False, True])
def test_leftmost_first_projects_only_the_picked_column_and_changes_nothing(shift, monkeypatch):
    """Leftmost first at one token per pass, the eager runner projects only the column every row
    picks (when the rows agree; rows of different lengths disagree in their first and last blocks):
    the same tokens, finish reasons and passes as projecting the whole block, eager or static.
    With shift, a block's first pass reads only the last clean column's logits and leaves the
    noisy block out (fewer rows)."""
    model = diffcoder.load(default_model_dir(), dtype="float32")
    tok = model.tokenizer
    prompts = [tok.encode(t) for t in ("def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self",
                                        "x = 1")]
    kw = dict(steps=24, gen_length=24, block_length=4, eos_id=tok.eos_id, remasking="left_to_right", shift=shift)
    widths, rows = [], []
    forward = type(model).forward

    def recording(self, ids, *args, logits_index=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(logits_index, slice):
            widths.append(logits_index.stop - logits_index.start)
            rows.append(ids.shape[1])
        return forward(self, ids, *args, logits_index=logits_index, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording)
    narrow = diffcoder.generate(model, prompts, **kw)
    assert widths.count(1) > len(widths) // 2 and max(widths) > 1  # narrowed mostly, not where rows disagree
    narrow_rows = rows[1:]
    monkeypatch.setattr(EagerRunner, "narrows_logits", False)
    widths.clear()
    rows.clear()
    whole = diffcoder.generate(model, prompts, **kw)
    assert min(widths[1:]) > 1  # the prefill aside, every pass projected its block
    assert len(narrow_rows) == len(rows[1:])
    if shift:  # the blocks' first passes: the clean block alone (B columns, not 2B)
        assert narrow_rows.count(4) > rows[1:].count(4) and sum(narrow_rows) < sum(rows[1:])
    else:
        assert narrow_rows == rows[1:]
    assert narrow.tokens == whole.tokens and narrow.finish_reasons == whole.finish_reasons and narrow.nfe == whole.nfe
    assert diffcoder.generate(model, prompts, runner="static", **kw).tokens == narrow.tokens
