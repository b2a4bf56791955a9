"""The tiny-model cache is private to its user: nothing another user plants in the temp folder is written
through or loaded."""
import json
import os
import stat
import tempfile

import pytest

from openprompt_retro import testing

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "text")


@pytest.fixture
def temp(tmp_path, monkeypatch):
    """An empty temp folder standing in for the shared /tmp, and a fast fake model builder counting its calls."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    built = []

    def fake_build(kind, directory, seed=0):
        built.append(kind)
        with open(os.path.join(directory, "TINY_MODEL.json"), "w") as f:
            json.dump({"kind": kind}, f)
        return directory

    monkeypatch.setattr(testing, "make_tiny_mlm", fake_build)
    return tmp_path, built


def test_cache_is_a_private_folder_and_a_second_build_is_a_hit(temp):
    tmp, built = temp
    path = testing.ensure_tiny_model("tiny-bert")
    assert testing.ensure_tiny_model("tiny-bert") == path and built == ["bert"]  # built once, then read
    root = os.path.dirname(path)
    assert root == os.path.join(str(tmp), f"openprompt-retro-{os.getuid()}")
    info = os.lstat(root)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0
    assert sorted(os.listdir(tmp)) == [os.path.basename(root)]  # nothing else in the shared folder


def test_symlink_planted_at_the_lock_path_does_not_truncate_its_target(temp):
    tmp, built = temp
    victim = tmp / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, testing.tiny_model_dir("tiny-bert") + ".lock")
    with pytest.raises(PermissionError, match=r"lock file .*tiny-bert.*\.lock is a symlink"):
        testing.ensure_tiny_model("tiny-bert")
    assert victim.read_text() == "precious" and built == []


def test_existing_lock_file_is_reused_not_truncated(temp):
    tmp, built = temp
    lock = testing.tiny_model_dir("tiny-bert") + ".lock"
    with open(lock, "w") as f:
        f.write("x")
    testing.ensure_tiny_model("tiny-bert")
    with open(lock) as f:
        assert f.read() == "x"


def _plant_model(root, name):
    """A cache folder holding a finished-looking tiny model, as an attacker would lay it out."""
    import transformers

    model = os.path.join(root, f"{name}-tf{transformers.__version__}")
    os.makedirs(model)
    with open(os.path.join(model, "TINY_MODEL.json"), "w") as f:
        f.write("{}")


def test_cache_owned_by_someone_else_is_refused(temp, monkeypatch):
    tmp, built = temp
    other = os.getuid() + 1
    _plant_model(os.path.join(str(tmp), f"openprompt-retro-{other}"), "tiny-bert")  # planted, owned by "us"
    monkeypatch.setattr(os, "getuid", lambda: other)  # ... so to the user `other` it belongs to someone else
    with pytest.raises(PermissionError, match=rf"openprompt-retro-{other} is owned by uid \d+, not by you"):
        testing.ensure_tiny_model("tiny-bert")
    assert built == []


def test_cache_writable_by_others_is_refused(temp):
    tmp, built = temp
    root = os.path.join(str(tmp), f"openprompt-retro-{os.getuid()}")
    _plant_model(root, "tiny-bert")
    os.chmod(root, 0o777)
    with pytest.raises(PermissionError, match="is writable by others \\(mode 777\\)"):
        testing.ensure_tiny_model("tiny-bert")
    assert built == []


def test_cache_path_that_is_a_symlink_is_refused(temp):
    tmp, built = temp
    elsewhere = tmp / "elsewhere"
    _plant_model(str(elsewhere), "tiny-bert")
    os.symlink(elsewhere, os.path.join(str(tmp), f"openprompt-retro-{os.getuid()}"))
    with pytest.raises(PermissionError, match="is not a folder"):
        testing.ensure_tiny_model("tiny-bert")
    assert built == []


@pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared data not present")
def test_cli_names_a_refused_cache_in_one_line(temp, capsys):
    tmp, built = temp
    root = os.path.join(str(tmp), f"openprompt-retro-{os.getuid()}")
    os.mkdir(root)
    os.chmod(root, 0o777)
    from openprompt_retro.cli import main

    with pytest.raises(SystemExit) as e:
        main(["speed", "--task", "mr", "--model", "tiny-bert", "--limit", "2", "--repeats", "1", "--data-root", DATA,
              "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip() == (f"openprompt-retro speed: error: the tiny-model cache {root} is writable by others "
                           "(mode 777); remove it, or point TMPDIR elsewhere")
