"""The bad-input contract, checked the same way for every case: exit status 2, one line
``depthprune: error: ...`` naming the problem, no traceback, and nothing on disk created or changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from depthprune.cli.app import main


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots`` (hidden ones too) with its size, mtime and content hash."""
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            state[str(root)] = ("missing",)
            continue
        entries = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in entries:
            if path.is_dir():
                state[str(path)] = ("dir",)
            elif path.is_file():
                stat = path.stat()
                state[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return state


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(capsys, argv, message: str, watch=(), code: int = 2) -> str:
    """Run the CLI on ``argv`` and check the contract; ``watch``: folders and files that must not change."""
    before = snapshot(*watch)
    status, _, err = run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("depthprune:")]
    assert status == code, f"exit {status}, expected {code}: {err}"
    assert "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("depthprune: error: "), err
    assert "internal error" not in errors[0], f"the safety net caught it, the class needs its own message: {err}"
    assert lines[-1] == errors[0], f"the error must be the last line: {err}"
    assert message.lower() in errors[0].lower(), f"expected {message!r} in: {errors[0]}"
    assert snapshot(*watch) == before, "a failed run changed or left files"
    return errors[0]
