"""Bad input becomes one line on stderr and exit code 2 (llava_brain/errors.py)."""

from pathlib import Path

import pytest

from llava_brain.errors import EXIT_BAD_INPUT, BadInputError, exits_on_bad_input, require_file


def test_bad_input_error_is_one_line_with_path():
    err = BadInputError("/data/nsd/x.hdf5", "expected dataset '/betas'\n  (int16)\tfound ['beta']")
    assert str(err) == "/data/nsd/x.hdf5: expected dataset '/betas' (int16) found ['beta']"
    assert err.path == Path("/data/nsd/x.hdf5")


def test_exits_on_bad_input_prints_one_error_line_and_returns_2(tmp_path, capsys):
    path = tmp_path / "nsd_expdesign.mat"

    @exits_on_bad_input
    def main(argv=None):
        """Stage entry point."""
        raise BadInputError(path, "missing; expected\nthe NSD design file")

    assert main.__name__ == "main" and main.__doc__ == "Stage entry point."
    assert main(["--x"]) == EXIT_BAD_INPUT == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert captured.err.endswith("\n")
    assert lines[0].startswith("error: ")
    assert lines[0] == f"error: {path}: missing; expected the NSD design file"


def test_exits_on_bad_input_normal_returns(capsys):
    calls = []

    @exits_on_bad_input
    def returns_none(*args, **kwargs):
        calls.append((args, kwargs))

    @exits_on_bad_input
    def returns_code(argv=None):
        return 3

    assert returns_none(["--a"], flag=True) == 0
    assert calls == [((["--a"],), {"flag": True})]
    assert returns_code() == 3
    assert capsys.readouterr().err == ""


def test_exits_on_bad_input_lets_other_errors_through():
    @exits_on_bad_input
    def main(argv=None):
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        main()


def test_require_file(tmp_path):
    existing = tmp_path / "a.txt"
    existing.write_text("x")
    assert require_file(str(existing), "a text file") == existing
    with pytest.raises(BadInputError) as excinfo:
        require_file(tmp_path / "b.txt", "the stimulus table")
    assert str(excinfo.value) == f"{tmp_path / 'b.txt'}: missing; expected the stimulus table"
    with pytest.raises(BadInputError):
        require_file(tmp_path, "a file, not a folder")
