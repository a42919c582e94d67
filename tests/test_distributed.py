"""Launching several training processes: what a process does when its peers never come (a launcher's variables
without the launcher), and how the processes of ``--devices N`` stop on a signal: one line, no traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import child_env

TINY = ["--set", "data.image_size=48", "--set", "train.batch_size=8", "--set", "train.num_threads=1", "--no-report"]

#: SLURM's variables in an `sbatch --ntasks-per-node 2` job script that runs bloodcell without srun.
SLURM_SCRIPT = {"SLURM_JOB_NAME": "job", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1",
                "SLURM_NODELIST": "localhost"}  # fmt: skip

#: The CLI with a rendezvous timeout of SECONDS: python -c CLI_WITH_TIMEOUT SECONDS ARGS...
CLI_WITH_TIMEOUT = textwrap.dedent("""
    import sys
    from datetime import timedelta
    from bloodcell.train import setup
    from bloodcell.cli import main

    setup.RENDEZVOUS_TIMEOUT = timedelta(seconds=float(sys.argv[1]))
    sys.argv = ["bloodcell", *sys.argv[2:]]
    main()
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def lone_torchrun_rank() -> dict[str, str]:
    """torchrun's variables for rank 0 of 2, with no torchrun and no rank 1."""
    return {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip


def wait_for_line(path: Path, text: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert process.poll() is None, f"ended (status {process.returncode}) before {text!r}:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} within {seconds} s:\n{path.read_text()}"
        time.sleep(0.2)


def group_is_running(group: int) -> bool:
    """Whether a process of this process group runs (a zombie waiting to be reaped does not)."""
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize(("env", "alone"), [
    ({"SLURM_NTASKS": "2"}, True),  # the job script's own process
    ({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, False),  # a task srun started
    ({"SLURM_NTASKS": "2", "SLURM_STEPID": "0"}, False),  # ... as old SLURM releases name it
    ({"SLURM_NTASKS": "1"}, False),  # one task: nothing to wait for
    ({}, False),
])  # fmt: skip
def test_a_slurm_job_script_without_srun_is_told_apart(env: dict[str, str], alone: bool) -> None:
    from bloodcell.train.setup import started_without_srun

    assert started_without_srun(env) is alone


def test_a_slurm_job_script_without_srun_is_refused_at_once(aria_dataset: Path, tmp_path: Path) -> None:
    """It waited for a task that never starts, silently, until SIGKILL (Lightning's rendezvous: 30 minutes)."""
    result = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--data", str(aria_dataset), "--out",
                             str(tmp_path / "run"), *TINY], env={**child_env(), **SLURM_SCRIPT},
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "SLURM_NTASKS=2, but srun did not start this process (no SLURM_STEP_ID)" in result.stderr
    assert "srun bloodcell ..." in result.stderr and "Traceback" not in result.stderr


def test_peers_that_never_come_end_the_wait_with_the_variables_it_came_from(aria_dataset: Path, tmp_path: Path) -> None:
    """A process given torchrun's variables without torchrun waited 30 minutes for rank 1, then crashed."""
    env = {**child_env(), **lone_torchrun_rank()}
    result = subprocess.run([sys.executable, "-c", CLI_WITH_TIMEOUT, "2", "train", "--data", str(aria_dataset), "--out",
                             str(tmp_path / "run"), *TINY], env=env, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "the 2 training processes did not all start within 2 s" in line
    assert "TORCHELASTIC_RUN_ID=x" in line and "WORLD_SIZE=2" in line and "Traceback" not in result.stderr


@pytest.mark.parametrize(("signal_number", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                              (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_a_signal_ends_the_wait_for_peers_at_once(aria_dataset: Path, tmp_path: Path, signal_number: int, status: int,
                                                  word: str) -> None:  # fmt: skip
    """The wait is one blocking C++ call, in which Python's handlers never ran: SIGTERM and Ctrl-C were ignored."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "bloodcell", "train", "--data", str(aria_dataset), "--out",
                                    str(tmp_path / "run"), *TINY], env={**child_env(), **lone_torchrun_rank()},
                                   stdout=subprocess.DEVNULL, stderr=handle)  # fmt: skip
    try:
        wait_for_line(err, "Initializing distributed", process)  # Lightning's line before the rendezvous
        time.sleep(1)
        process.send_signal(signal_number)
        assert process.wait(timeout=10) == status
    finally:
        stop(process)
    last = err.read_text().splitlines()[-1]
    assert last.startswith(f"{word} while the training processes waited for each other to start (")
    assert "WORLD_SIZE=2" in last and "Traceback" not in err.read_text()


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-first-process", "to-the-process-group"])
def test_two_cpu_processes_stopped_by_sigterm_say_so_in_one_line(aria_dataset: Path, tmp_path: Path,
                                                                 to_group: bool) -> None:  # fmt: skip
    """`kill -TERM` reached the first process only: it said how to resume, and the second then died at its next
    collective with 80 lines of "Connection closed by peer". `timeout` signals the whole group (the second then
    gets SIGTERM twice: from timeout and from the first)."""
    err = tmp_path / "stderr.txt"
    run = tmp_path / "run"
    with err.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "bloodcell", "train", "--data", str(aria_dataset), "--out",
                                    str(run), "--devices", "2", *TINY, "--set", "train.epochs=500"],
                                   env={**child_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                   stderr=handle, start_new_session=True)  # fmt: skip
    try:
        wait_for_line(err, "epoch 2/", process)
        if to_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        deadline = time.monotonic() + 30
        while group_is_running(process.pid):
            assert time.monotonic() < deadline, "the second process is still running"
            time.sleep(0.2)
    finally:
        stop(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group of this test's processes (its own session)
    text = err.read_text()
    said = [line for line in text.splitlines() if line.startswith(("terminated", "interrupted", "[rank"))]
    assert said == [f"terminated; continue with: bloodcell train --resume {run} --devices 2"], text[-3000:]
    assert "Traceback" not in text and "Connection closed" not in text


def run_main(monkeypatch: pytest.MonkeyPatch, command, **env: str) -> int:
    """bloodcell.cli.main with ``command`` as its app, in the process ``env`` describes; the exit status."""
    import bloodcell.cli as cli
    import bloodcell.train.run  # noqa: F401 - a training process has it; main() asks it which rank this is

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return int(exit_info.value.code or 0)


def test_a_second_process_whose_peer_ended_leaves_without_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def peer_gone() -> None:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:26027")

    assert run_main(monkeypatch, peer_gone, LOCAL_RANK="1") == 1
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="closed by peer"):  # in the first process it is a failure to show
        run_main(monkeypatch, peer_gone)
    monkeypatch.setenv("BLOODCELL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="closed by peer"):  # ... and kept for a bug report
        run_main(monkeypatch, peer_gone, LOCAL_RANK="1")


def test_only_the_first_process_says_it_was_interrupted(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Ctrl-C on a terminal reaches every process of `--devices N`: the second added its own "interrupted"."""
    from bloodcell.cli import _interrupt

    def interrupted() -> None:
        try:
            _interrupt(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise SystemExit(130) from None  # as Typer ends on one

    assert run_main(monkeypatch, interrupted, LOCAL_RANK="1") == 130
    assert capsys.readouterr().err == ""
    assert run_main(monkeypatch, interrupted) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_second_sigterm_does_not_break_off_the_first_one_s_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.cli import Interrupted, _interrupt

    monkeypatch.setattr(Interrupted, "by", None)
    with pytest.raises(Interrupted):
        _interrupt(signal.SIGTERM, None)
    try:
        _interrupt(signal.SIGTERM, None)
    except KeyboardInterrupt:
        pytest.fail("a second SIGTERM interrupted the stop the first one began")
    with pytest.raises(Interrupted):  # Ctrl-C still stops at once
        _interrupt(signal.SIGINT, None)
