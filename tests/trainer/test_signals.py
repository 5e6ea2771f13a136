"""Ctrl-C and SIGTERM: the first signal finishes the step, writes a checkpoint and exits 130 / 143 with one line
saying where; a second Ctrl-C exits at once. The exits are of real `python -m dpo_kernels train` processes."""
import os
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from dpo_kernels import cli
from dpo_kernels.trainer import checkpoint
from dpo_kernels.trainer import forward as dpo_forward
from tests.tiny_models import tiny_setup

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny_signals"), rows=32)


def start_run(tiny, out: Path) -> subprocess.Popen:
    """A run far longer than the test (each step 16 micro-batches), printing one line per step."""
    argv = [sys.executable, "-m", "dpo_kernels", "train", "--model", tiny["model"], "--data", tiny["data"],
            "--output-dir", str(out), "--max-steps", "100000", "--batch-size", "1", "--grad-accum", "16",
            "--max-length", "32", "--loss-backend", "reference", "--no-progress", "--no-plot"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(stream, prefix: str) -> str:
    for line in stream:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the stream ended before a line starting with {prefix!r}")


def interrupt_run(tiny, out: Path, *signals: signal.Signals) -> tuple[int, str]:
    """Starts a run and sends it `signals` once step 1 is printed, each after the run acknowledges the one before;
    returns the exit status and stderr."""
    proc = start_run(tiny, out)
    try:
        wait_for_line(proc.stdout, "step 1/")
        proc.send_signal(signals[0])
        for before, sig in pairwise(signals):
            wait_for_line(proc.stderr, f"{before.name}: finishing this step")
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        proc.kill()


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny, tmp_path):
    rc, err = interrupt_run(tiny, tmp_path / "out", signal.SIGTERM)
    assert rc == 143 and "Traceback" not in err, err
    saved = checkpoint.latest_checkpoint(tmp_path / "out")
    assert saved is not None, err
    state = checkpoint.read_state(saved)  # complete: every file present and whole
    assert state.step >= 1
    assert err.strip().splitlines()[-1] == (f"dpo-kernels train: stopped by SIGTERM after step {state.step}; "
                                            f"checkpoint saved to {saved} (continue with --resume)")


def test_ctrl_c_finishes_the_step_then_saves(tiny, tmp_path, monkeypatch, capsys):
    """In-process through cli.main: Ctrl-C arrives in the middle of step 2, which still completes and is saved."""
    real = dpo_forward.DPOForward.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2's first micro-batch of two
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dpo_forward.DPOForward, "forward", forward)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(out),
                   "--max-steps", "10", "--batch-size", "1", "--grad-accum", "2", "--max-length", "32",
                   "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert err.splitlines()[-1] == (f"dpo-kernels train: stopped by SIGINT after step 2; checkpoint saved to "
                                    f"{out / 'checkpoint-2'} (continue with --resume)")
    assert calls["n"] == 4 and checkpoint.read_state(out / "checkpoint-2").step == 2
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone again


def test_second_ctrl_c_exits_at_once(tiny, tmp_path):
    rc, err = interrupt_run(tiny, tmp_path / "out", signal.SIGINT, signal.SIGINT)
    assert rc == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "dpo-kernels train: interrupted; nothing saved since the last checkpoint"
    assert checkpoint.latest_checkpoint(tmp_path / "out") is None
