"""Secret values from the environment never reach a log line, whether logs go to the store's log
file or (`--verbose`) to the terminal: a library that logs a token is redacted on both paths."""

import logging

import pytest

from orchestrator.cli import LIBRARY_LOGGERS, quiet_libraries

SECRET = "hf_zz9RedactMe0001"


@pytest.fixture()
def clean_logging(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in ("", *LIBRARY_LOGGERS)}
    yield
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


@pytest.mark.parametrize("verbose", [False, True])
def test_a_logged_secret_is_redacted(clean_logging, tmp_path, capsys, verbose):
    log_file = tmp_path / "saferay.log"
    quiet_libraries(log_file, verbose)
    for name in ("mlflow", "ray.train", "saferay"):
        logging.getLogger(name).warning("connecting with token %s", SECRET)
    for handler in logging.getLogger("mlflow").handlers:
        handler.flush()
    out = capsys.readouterr().err + (log_file.read_text() if log_file.exists() else "")
    assert out.count("connecting with token ***") == 3, out
    assert SECRET not in out
