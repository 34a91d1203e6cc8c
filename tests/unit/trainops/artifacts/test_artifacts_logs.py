"""``logs/train.log``: the apt logger's lines, timestamped, redacted, one file per run."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from apt.core.logs import ConsoleHandler, RunFileHandler, attach_file_log, detach_file_log
from apt.trainops.artifacts import LOG_FILE, ArtifactManager

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) apt[.\w]*: .+$")


def file_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, RunFileHandler)]


def test_lines_are_timestamped_with_their_level(tmp_path: Path, apt_logger: logging.Logger) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    path = manager.attach_log_file()
    assert path == tmp_path / "run" / LOG_FILE
    apt_logger.info("run folder: %s", "runs/run")
    logging.getLogger("apt.trainops.loop").warning("loss is %s", "nan")
    apt_logger.debug("not at INFO")
    manager.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(LINE.match(line) for line in lines), lines
    assert lines[0].endswith("INFO apt: run folder: runs/run")
    assert lines[1].endswith("WARNING apt.trainops.loop: loss is nan")


def test_a_resumed_run_appends(tmp_path: Path, apt_logger: logging.Logger) -> None:
    for attempt in ("first start", "resumed"):
        manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
        manager.attach_log_file()
        apt_logger.info(attempt)
        manager.close()
    lines = (tmp_path / "run" / LOG_FILE).read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first start", "resumed"]


def test_two_runs_in_one_process_keep_their_own_lines(
    tmp_path: Path, apt_logger: logging.Logger
) -> None:
    before = list(apt_logger.handlers)
    first = ArtifactManager(output_dir=tmp_path, experiment_name="first")
    first.attach_log_file()
    apt_logger.info("line of the first run")
    first.close()
    assert apt_logger.handlers == before  # detached: no handler leaks into the next run
    second = ArtifactManager(output_dir=tmp_path, experiment_name="second")
    second.attach_log_file()
    apt_logger.info("line of the second run")
    second.close()
    assert apt_logger.handlers == before
    first_text = (tmp_path / "first" / LOG_FILE).read_text()
    second_text = (tmp_path / "second" / LOG_FILE).read_text()
    assert "line of the first run" in first_text and "second run" not in first_text
    assert "line of the second run" in second_text and "first run" not in second_text


def test_attaching_twice_writes_each_line_once(tmp_path: Path, apt_logger: logging.Logger) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    assert manager.attach_log_file() == manager.attach_log_file()
    # A second manager of the same folder (a notebook cell run twice, the first never closed)
    # replaces the first one's handler rather than doubling every line.
    again = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    again.attach_log_file()
    assert len(file_handlers(apt_logger)) == 1
    apt_logger.info("once")
    again.close()
    manager.close()  # its handler was replaced already: a no-op
    assert file_handlers(apt_logger) == []
    assert (tmp_path / "run" / LOG_FILE).read_text().count("once") == 1


def test_file_lines_are_redacted(tmp_path: Path, apt_logger: logging.Logger) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    path = manager.attach_log_file()
    assert path is not None
    apt_logger.info("pushing to %s", "https://alice:pw-1@hub.example/repo?token=tk-2")
    try:
        raise RuntimeError("cannot reach https://bob:pw-3@db.example")
    except RuntimeError:
        apt_logger.exception("upload failed")
    apt_logger.info("%d%% done, %s", 100, "3 of 3")  # a % in the text survives redaction
    apt_logger.info("bad format %d, password %s", "pw-8")  # its arguments are left out
    manager.close()
    text = path.read_text()
    for secret in ("pw-1", "tk-2", "pw-3", "pw-8"):
        assert secret not in text
    assert "https://alice:***@hub.example/repo?token=***" in text
    assert "RuntimeError: cannot reach https://bob:***@db.example" in text
    assert "100% done, 3 of 3" in text
    assert "bad format %d, password %s (its arguments tuple did not fit)" in text


def test_console_lines_are_redacted(
    apt_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    apt_logger.addHandler(ConsoleHandler(always=True))
    apt_logger.propagate = False
    apt_logger.info("pulling %s", "https://carol:pw-5@data.example/x")
    err = capsys.readouterr().err
    assert err == "pulling https://carol:***@data.example/x\n"


def test_application_handlers_get_the_redacted_record_too(
    tmp_path: Path, apt_logger: logging.Logger
) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    collect = Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    try:
        apt_logger.propagate = True
        handler = attach_file_log(tmp_path / "x.log")
        apt_logger.info("token=%s", "tk-6")
        detach_file_log(handler)
        detach_file_log(handler)  # twice: a no-op
    finally:
        root.removeHandler(collect)
    assert seen == ["token=***"]


def test_save_logs_appends_redacted_lines_into_logs(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    path = manager.save_logs(["step 1", "push to https://u:pw-7@h/x"])
    assert path == tmp_path / "run" / "logs" / "train.log"
    manager.save_logs(["step 2\n"])
    assert path.read_text() == "step 1\npush to https://u:***@h/x\nstep 2\n"
    other = manager.save_logs(["eval"], name="eval.log")
    assert other == tmp_path / "run" / "logs" / "eval.log" and other.read_text() == "eval\n"
    with pytest.raises(ValueError, match="not a file name"):
        manager.save_logs(["x"], name="../escape.log")


def test_other_ranks_write_no_log_file(tmp_path: Path, apt_logger: logging.Logger) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run", is_main=False)
    assert manager.attach_log_file() is None
    assert manager.save_logs(["x"]) is None
    assert file_handlers(apt_logger) == []
    assert list(tmp_path.iterdir()) == []


def test_archiving_the_run_folder_moves_the_log_file_along(
    tmp_path: Path, apt_logger: logging.Logger
) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="run")
    manager.lock()
    manager.attach_log_file()
    apt_logger.info("old run")
    archived = manager.archive_existing()
    assert archived is not None
    apt_logger.info("new run")
    manager.close()
    manager.unlock()
    assert "new run" not in (archived / LOG_FILE).read_text()
    new_text = (tmp_path / "run" / LOG_FILE).read_text()
    assert "new run" in new_text and "old run" not in new_text
