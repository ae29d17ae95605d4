"""sagesla.files: whole files or none (the safetensors writers' twin tests are in test_checkpoints.py)."""

import re

import pytest

from sagesla.files import check_output_path, write_atomic, write_text_atomic


def test_write_text_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_text_atomic(path, "new text")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize(
    ("target", "error", "named"),
    [
        pytest.param("missing/report.json", FileNotFoundError, "missing", id="missing-folder"),
        pytest.param("deep/er/report.json", FileNotFoundError, "er", id="missing-folders"),
        pytest.param("folder", IsADirectoryError, "folder", id="a-folder"),
        pytest.param("new/", IsADirectoryError, "new/", id="trailing-separator"),
        pytest.param("file.txt/report.json", NotADirectoryError, "file.txt", id="folder-is-a-file"),
    ],
)
def test_write_text_atomic_names_the_target_when_it_cannot_write(tmp_path, target, error, named):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("kept")
    with pytest.raises(error) as raised:
        write_text_atomic(f"{tmp_path}/{target}", "new")
    message = str(raised.value)
    assert str(tmp_path / target).rstrip("/") in message and named in message and ".tmp" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"] and not any(
        (tmp_path / "folder").iterdir()
    )


def test_write_atomic_refuses_an_unwritable_folder_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    written = []
    with pytest.raises(PermissionError, match=r"report\.json'.* is not writable"):
        write_atomic(tmp_path / "report.json", written.append)
    assert written == [] and list(tmp_path.iterdir()) == []


def test_write_atomic_names_the_target_when_the_temporary_cannot_be_made(tmp_path, monkeypatch):
    def refuse(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.open", refuse)
    with pytest.raises(PermissionError, match=r"cannot write '.*report\.json': Permission denied$"):
        write_text_atomic(tmp_path / "report.json", "new")


@pytest.mark.parametrize(
    ("target", "folder", "error"),
    [
        pytest.param("missing/x.safetensors", False, FileNotFoundError, id="file-missing-folder"),
        pytest.param("folder", False, IsADirectoryError, id="file-is-a-folder"),
        pytest.param("", False, IsADirectoryError, id="file-empty"),
        pytest.param("file.txt", True, NotADirectoryError, id="folder-is-a-file"),
        pytest.param("file.txt/sub", True, NotADirectoryError, id="folder-under-a-file"),
    ],
)
def test_check_output_path_refuses_naming_the_path(tmp_path, monkeypatch, target, folder, error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("kept")
    with pytest.raises(error, match=re.escape(repr(target))):
        check_output_path(target, folder=folder)


def test_check_output_path_accepts_new_files_and_folders(tmp_path):
    (tmp_path / "old.json").write_text("old")
    assert check_output_path(tmp_path / "new.json") == tmp_path / "new.json"
    assert check_output_path(tmp_path / "old.json") == tmp_path / "old.json"
    assert check_output_path(str(tmp_path / "a" / "b"), folder=True) == tmp_path / "a" / "b"
    assert check_output_path(tmp_path, folder=True) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
