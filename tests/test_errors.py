"""hsd_exp.errors: every entry point reports a ConfigError as one line ``error: <message>`` and exit status 2."""

from __future__ import annotations

import pytest

from hsd_exp.errors import BAD_INPUT, ConfigError, exit_on_config_error


def test_a_config_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exit_, exit_on_config_error():
        raise ConfigError("decode.draft_len=0 must be a positive integer; set decode.draft_len=4")
    assert exit_.value.code == BAD_INPUT == 2
    err = capsys.readouterr().err
    assert err == "error: decode.draft_len=0 must be a positive integer; set decode.draft_len=4\n"


def test_anything_else_passes_through(capsys):
    with exit_on_config_error():
        pass
    with pytest.raises(KeyError), exit_on_config_error():  # a bug keeps its traceback
        raise KeyError("x")
    assert capsys.readouterr().err == ""
