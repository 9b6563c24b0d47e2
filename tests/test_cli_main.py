"""What every command shares: one-line errors, the safety net, SIGTERM, disk full, output checks and locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from badinput import assert_clean_failure, run

import depthprune
from depthprune.cli import app as cli
from depthprune.errors import DepthpruneError
from depthprune.outputs import (
    LOCK_SUFFIX,
    TEMP_MARK,
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    output_lock,
    remove_stale_temporaries,
)


def _failing_run(exc: BaseException):
    def run_command(args):
        raise exc

    return run_command


@pytest.fixture
def analyze_does(monkeypatch):
    """Replace the work of `depthprune analyze` by the function the test installs (argument parsing stays)."""
    parser = cli.build_parser

    def install(work):
        def build():
            p = parser()
            p._subparsers._group_actions[0].choices["analyze"].set_defaults(run=work)
            return p

        monkeypatch.setattr(cli, "build_parser", build)

    return install


@pytest.fixture
def broken_analyze(analyze_does):
    """`depthprune analyze` whose work raises the exception the test passes."""
    return lambda exc: analyze_does(_failing_run(exc))


def test_unexpected_exception_is_one_line_pointing_to_debug(broken_analyze, capsys, tmp_path):
    broken_analyze(ValueError("boom\nsecond line"))
    code, out, err = run(capsys, "analyze", tmp_path, "--data", tmp_path, "--out", tmp_path / "o")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "depthprune: error: internal error (ValueError: boom); rerun with --debug for the traceback and report it"
    ]


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_shows_the_traceback_wherever_it_is_given(broken_analyze, tmp_path, where):
    broken_analyze(ValueError("boom"))
    argv = ["analyze", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="boom"):
        cli.main(["--debug", *argv] if where == "first" else [*argv, "--debug"])


@pytest.mark.parametrize(("exc", "message"), [
    (OSError(28, "No space left on device"), "no space left on the disk"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left"),
    (PermissionError(13, "Permission denied", "/root/x"), "permission denied '/root/x'"),
    (OSError(5, "Input/output error", "/dev/x"), "Input/output error '/dev/x'"),
])
def test_os_errors_get_their_own_line(broken_analyze, capsys, tmp_path, exc, message):
    broken_analyze(exc)
    assert_clean_failure(capsys, ["analyze", tmp_path, "--data", tmp_path, "--out", tmp_path / "o"], message,
                         watch=[tmp_path])


def test_sigterm_cleans_up_like_ctrl_c(analyze_does, capsys, tmp_path):
    out = tmp_path / "out"

    def terminate_while_writing(args):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns

    analyze_does(terminate_while_writing)
    code, _, err = run(capsys, "analyze", tmp_path, "--data", tmp_path, "--out", out)
    assert code == 143 and err.strip() == "depthprune: terminated"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm  # the handler is only installed while running


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: big enough for a folder, too small for a model (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_one_line_and_leaves_nothing(small_disk, tiny_checkpoint, capsys):
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, "--n", 1, "--criterion", "deepest", "--out",
                                  small_disk / "pruned"], "no space left on the disk",
                         watch=[small_disk, tiny_checkpoint])
    assert list(small_disk.iterdir()) == []


def test_output_checks(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(DepthpruneError, match="overlaps the input"):
        check_output_dir(model, force=True, inputs=[model])
    with pytest.raises(DepthpruneError, match="overlaps the input"):
        check_output_dir(model / "sub", force=True, inputs=[str(model) + "/"])
    with pytest.raises(DepthpruneError, match="overlaps the input"):
        check_output_dir(tmp_path, force=True, inputs=[model])  # the output would contain the input
    with pytest.raises(DepthpruneError, match="is a file"):
        check_output_dir(model / "config.json" / "out", force=False)
    with pytest.raises(DepthpruneError, match="not a directory"):
        check_output_dir(model / "config.json", force=True)
    monkeypatch.chdir(model)
    with pytest.raises(DepthpruneError, match="current directory"):
        check_output_dir(".", force=True)
    with pytest.raises(DepthpruneError, match="current directory"):
        check_output_dir(tmp_path, force=True)
    with pytest.raises(DepthpruneError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(DepthpruneError, match="overlaps the input"):
        check_output_file(model / "config.json", inputs=[model])
    assert check_output_dir(tmp_path / "new" / "deeper", force=False) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_lock_refuses_a_second_writer_and_is_removed(tmp_path):
    out = tmp_path / "out"
    with output_lock(out), pytest.raises(DepthpruneError, match="another depthprune run is writing"):
        with output_lock(out):
            pass
    assert list(tmp_path.iterdir()) == []
    with output_lock(out):  # free again
        assert (tmp_path / f".out{LOCK_SUFFIX}").exists()


def test_lock_of_a_killed_process_is_free(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from depthprune.outputs import output_lock\n"
            "with output_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)")
    src = os.path.join(os.path.dirname(depthprune.__file__), "..")
    holder = subprocess.Popen([sys.executable, "-c", code, src, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DepthpruneError, match="another depthprune run"), output_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / f".out{TEMP_MARK}{sleeper.pid}-abc"
        dead_tmp = tmp_path / f".out{TEMP_MARK}{dead.pid}-def"
        dead_file = tmp_path / f".out{TEMP_MARK}{dead.pid}-ghi"
        other = tmp_path / f".other{TEMP_MARK}{dead.pid}-jkl"
        for folder in (live_tmp, dead_tmp, other):
            folder.mkdir()
            (folder / "weights.bin").write_bytes(b"0" * 100)
        dead_file.write_text("half")
        assert sorted(p.name for p in remove_stale_temporaries(out)) == sorted([dead_tmp.name, dead_file.name])
        assert live_tmp.exists() and other.exists() and not dead_tmp.exists() and not dead_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: COMMAND"),
    (["prune", "m", "--n", "abc", "--out", "o"], "argument --n: invalid int value: 'abc'"),
    (["prune", "m", "--n", "1", "--layers", "2", "--out", "o"], "not allowed with argument"),
    (["analyse", "m"], "invalid choice: 'analyse'"),
    (["eval", "m", "--shots"], "expected one argument"),
])
def test_argument_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = assert_clean_failure(capsys, argv, message, watch=[tmp_path])
    assert line.endswith("--help`)")


def test_replace_dir_swaps_in_one_step(tmp_path, monkeypatch):
    from depthprune import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = outputs.temporary_dir_beside(out)
    (new / "new.txt").write_text("new")
    swapped = []
    real = outputs._exchange
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: swapped.append(real(a, b)) or swapped[-1])
    outputs.replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and list(tmp_path.iterdir()) == [out]
    if swapped != [True]:
        pytest.skip("this filesystem cannot swap two paths atomically (renameat2 RENAME_EXCHANGE)")


def test_replace_dir_without_the_atomic_swap(tmp_path, monkeypatch):
    from depthprune import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = outputs.temporary_dir_beside(out)
    (new / "new.txt").write_text("new")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    outputs.replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and list(tmp_path.iterdir()) == [out]
