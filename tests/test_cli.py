"""The `sleepscale` command itself: arguments, the dispatch table, lazy imports, and the notices
libraries print as they load (kept out of the commands' output)."""

import importlib
import logging
import os
import subprocess
import sys
import warnings

import pytest

from sleepscale import notices
from sleepscale.cli import COMMANDS, USER_ERRORS_ELSEWHERE, _parser, main

# What megatron-core, fla and DeepSpeed print as they load on a machine without Transformer Engine,
# Triton or a GPU.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_NOTICES = (
    "Transformer Engine and Apex are not installed",
    "Triton is not supported on current platform",
    "Setting accelerator to CPU",
)


def test_every_command_is_parsed_and_dispatched():
    commands = next(action for action in _parser()._actions if action.dest == "command").choices
    assert set(commands) == set(COMMANDS) | {"config"}


@pytest.mark.parametrize("target", [*COMMANDS.values(), *USER_ERRORS_ELSEWHERE])
def test_the_dispatch_table_names_real_functions(target):
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["config", "c.yaml"], False),
        (["--verbose", "config", "c.yaml"], True),
        (["config", "c.yaml", "--verbose"], True),
        (["--verbose", "plan", "c.yaml", "--gpus", "1", "--gpu-memory", "1", "--sequence-length", "8"], True),
        (["data", "rule110", "--out", "o", "--verbose"], True),
    ],
)
def test_verbose_goes_before_or_after_the_command(argv, verbose):
    assert _parser().parse_args(argv).verbose is verbose


def test_help_and_config_import_no_command_module():
    """`sleepscale --help` and `sleepscale config` stay fast: torch and the rest load with the commands."""
    script = (
        "import sys\nfrom sleepscale.cli import main\n"
        "assert main(['config', 'configs/plan/hybrid-1b.yaml', 'sleep.passes=3']) == 0\n"
        "heavy = {'torch', 'deepspeed', 'megatron', 'fla', 'mlflow'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "  passes: 3\n" in result.stdout


def _library_file(name: str) -> str:
    return os.path.join(notices._site_directories()[0], *name.split(".")) + ".py"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_are_routed_and_ours_are_shown(verbose, capsys):
    with pytest.warns(UserWarning) as shown:  # outside `routed`: it records what `routed` passes on
        before = warnings.showwarning
        with notices.routed(verbose=verbose):
            for _ in range(2):  # "always" (pytest.warns): the library's notice comes twice, is shown once
                warnings.warn_explicit("Falling back to CPU", UserWarning, _library_file("somelib.hardware"), 7)
            warnings.warn_explicit("our own warning", UserWarning, notices.__file__, 1)
            warnings.warn_explicit("a script's warning", UserWarning, "/somewhere/script.py", 1)
        assert warnings.showwarning is before
    assert [str(w.message) for w in shown] == ["our own warning", "a script's warning"]
    err = capsys.readouterr().err
    if verbose:
        assert err == "notice: somelib.hardware: UserWarning: Falling back to CPU\n"
    else:
        assert err == ""
    assert notices.log.handlers == [] and notices.log.level == logging.NOTSET


def test_deepspeeds_accelerator_line_is_routed(capsys):
    logger = logging.getLogger("DeepSpeed")
    record = dict(
        name="DeepSpeed",
        levelno=logging.WARNING,
        levelname="WARNING",
        filename="real_accelerator.py",
        msg="Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    )
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        with notices.routed(verbose=True):
            logger.handle(logging.makeLogRecord(record))
            logger.handle(logging.makeLogRecord({**record, "filename": "engine.py", "msg": "a ZeRO warning"}))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["a ZeRO warning"]  # DeepSpeed's other lines stay its own
    assert capsys.readouterr().err == f"notice: deepspeed.accelerator: {record['msg']}\n"


@pytest.mark.slow
def test_plan_prints_no_library_notices_unless_verbose():
    """hybrid-8b (tensor parallel: megatron-core's layers, fla's kernels) as in its header."""
    command = [
        sys.executable,
        "-m",
        "sleepscale.cli",
        "plan",
        "configs/plan/hybrid-8b.yaml",
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--sequence-length",
        "8192",
    ]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert not any(text in quiet.stderr for text in LIBRARY_NOTICES) and "Warning" not in quiet.stderr, quiet.stderr
    assert quiet.stdout == verbose.stdout and quiet.stdout.startswith("layout: TP4 x PP1 x DP2")
    lines = verbose.stderr.splitlines()
    assert all(line.startswith("notice: ") for line in lines), verbose.stderr
    assert len(set(lines)) == len(lines), verbose.stderr  # each at most once (megatron-core's modules each say theirs)
    assert sum("Triton is not supported" in line for line in lines) <= 1, verbose.stderr  # fla says it twice


@pytest.mark.parametrize("option", ["--bits", "--strings"])
def test_an_impossible_task_size_is_one_line(option, tmp_path, capsys):
    assert main(["data", "rule110", option, "0", "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be >= 1" in err, err
    assert not (tmp_path / "data").exists()
