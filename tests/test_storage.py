"""Where checkpoints live: local folders and a real S3-compatible server (moto, on 127.0.0.1).

Also what decides that a rerun is the same run (``checkpoint.first_difference``).
"""

from pathlib import Path

import pytest

from bioray.checkpoint import first_difference
from bioray.config import Config, to_dict
from bioray.storage import full_uri, latest_checkpoint, local_copy, move_aside, read_text, run_root



def test_first_difference_names_the_first_training_key():
    saved = to_dict(Config())
    same = to_dict(Config())
    same["run"]["dir"], same["eval"]["max_examples"], same["train"]["keep_checkpoints"] = "elsewhere", 3, 9
    assert first_difference(saved, same) is None  # where it runs and how it is scored: the same run
    other = to_dict(Config())
    other["train"]["lr"], other["lora"]["rank"] = 1e-3, 4
    assert first_difference(saved, other) == ("lora.rank", 16, 4)  # sorted: lora before train
    other["lora"]["rank"] = 16
    assert first_difference(saved, other) == ("train.lr", 2e-4, 1e-3)


def test_run_root_gives_each_run_its_own_folder(tmp_path):
    assert run_root(str(tmp_path / "a"), None, None) == str(tmp_path / "a")
    assert run_root("runs/x", "s3://b/p/", None) == "s3://b/p/x"
    assert run_root("runs/x", "s3://b/p", "search/trials/t1") == "s3://b/p/search/trials/t1"
    assert run_root("runs/x", str(tmp_path / "store"), None) == str(tmp_path / "store" / "x")
    assert full_uri("b/p/x/checkpoints/step-000010", "s3://b/p") == "s3://b/p/x/checkpoints/step-000010"
    assert full_uri(str(tmp_path / "c"), None) == str(tmp_path / "c")


def _checkpoints(root: Path, *steps):
    for s in steps:
        d = root / "checkpoints" / f"step-{s:06d}"
        d.mkdir(parents=True)
        (d / "bioray.yaml").write_text(f"step: {s}\n")


def test_latest_checkpoint_and_move_aside_on_a_local_folder(tmp_path):
    root = tmp_path / "run"
    assert latest_checkpoint(str(root)) is None
    _checkpoints(root, 10, 200, 30)
    (root / "checkpoints" / "step-x").mkdir()
    latest = latest_checkpoint(str(root))
    assert latest == str(root / "checkpoints" / "step-000200") and read_text(f"{latest}/bioray.yaml") == "step: 200\n"
    moved = move_aside(str(root))
    assert latest_checkpoint(str(root)) is None and sorted(p.name for p in Path(moved).iterdir()) == \
        ["step-000010", "step-000030", "step-000200", "step-x"]  # moved, not deleted


def test_latest_checkpoint_move_aside_and_download_on_s3(s3, tmp_path):
    import pyarrow.fs as pafs

    local = tmp_path / "local"
    _checkpoints(local, 10, 20)
    root = run_root("runs/r1", s3 + "/prefix", None)
    fs, path = pafs.FileSystem.from_uri(root)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    latest = latest_checkpoint(root)
    assert latest == f"{s3}/prefix/r1/checkpoints/step-000020"
    with local_copy(latest) as d:
        assert (d / "bioray.yaml").read_text() == "step: 20\n"
    assert not d.exists()  # the download is temporary
    moved = move_aside(root)
    assert latest_checkpoint(root) is None and moved.startswith(f"{s3}/prefix/r1/checkpoints.replaced-")
    assert read_text(f"{moved}/step-000010/bioray.yaml") == "step: 10\n"


def test_checksums_catch_a_changed_or_missing_file(tmp_path):
    from bioray.checkpoint import verify, write_checksums
    from bioray.errors import CheckpointError

    ckpt = tmp_path / "step-000010"
    (ckpt / "resume").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (ckpt / "resume" / "rng-rank001.safetensors").write_bytes(b"rng")
    write_checksums(ckpt, 0)
    verify(ckpt)
    data = (ckpt / "adapter_model.safetensors").read_bytes()
    (ckpt / "adapter_model.safetensors").write_bytes(data[:-10])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: checksum mismatch"):
        verify(ckpt)
    (ckpt / "adapter_model.safetensors").write_bytes(data)
    (ckpt / "resume" / "rng-rank001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng-rank001.safetensors: missing"):
        verify(ckpt)


def test_a_folder_published_to_the_bucket_is_uploaded_once_and_copied_once_per_node(s3, tmp_path, monkeypatch):
    from bioray.storage import PUBLISHED, exists, file_task_options, node_copy, publish_folder

    model = tmp_path / "tiny-abc"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    uri = publish_folder(model, s3 + "/runs", "models")
    assert uri.startswith(f"{s3}/runs/_shared/models/tiny-abc-") and exists(f"{uri}/{PUBLISHED}")
    assert publish_folder(model, s3 + "/runs", "models") == uri  # unchanged: the same copy
    (model / "config.json").write_text('{"a": 2}')
    changed = publish_folder(model, s3 + "/runs", "models")
    assert changed != uri and read_text(f"{changed}/config.json") == '{"a": 2}'  # changed: a new copy

    # A node that sees the folder loads it where it is; one that does not gets its own copy, once.
    assert node_copy(str(model), uri) == str(model)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    elsewhere = node_copy(str(tmp_path / "gone" / "tiny-abc"), uri)
    assert Path(elsewhere).parent == tmp_path / "node-tmp" / "bioray-shared"
    assert (Path(elsewhere) / "sub" / "weights.bin").read_bytes() == b"\0" * 1000
    assert node_copy(str(tmp_path / "gone" / "tiny-abc"), uri) == elsewhere
    assert node_copy("org/model-on-the-hub", uri) == "org/model-on-the-hub"
    # File tasks go anywhere while a filesystem is shared (no URI): nothing but their CPUs is asked.
    assert file_task_options(None, 0.25) == {"num_cpus": 0.25}
    assert file_task_options(str(tmp_path), 1.0) == {"num_cpus": 1.0}
