"""The fault matrix, driven through the CLI as an operator does it: `megalora sft` on 2 ranks,
a real signal to one rank, to the command (the launcher) or to its process group (a terminal's
Ctrl-C, `kill -- -PGID`), at a step or inside a checkpoint save.

    target          at a step                   inside a save
    rank            SIGTERM, SIGKILL            SIGINT, SIGKILL (rank 0, the writer; rank 1)
    launcher        SIGTERM, SIGKILL            SIGINT, SIGKILL (the first save), grace period expiry
    group           SIGINT, SIGKILL             SIGTERM, SIGKILL
    every process   SIGTERM (systemd's stop)

SIGINT and SIGTERM share one handler in the ranks and one in the launcher, so each target takes
each of them once. The moment is chosen without timing: `MEGALORA_TEST_PAUSE` makes rank 0 wait
at a named point (mid-step n, or inside the save of checkpoint-n with its adapter file written)
until the test, having sent its signal, lets it go.

After each fault: no process of the job is left, every checkpoint folder verifies, `latest` names
the checkpoint it should (the stop's for SIGTERM/SIGINT, the last complete one for SIGKILL), a
half-written save is a `.tmp-*` folder that the next start removes and reports. Each chain of
faults resumes with `--resume latest` after every one of them and ends where an uninterrupted run
ends (float64, as tests/test_train_parity.py compares)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 8
BOUND_S = 600  # a bound for a loaded machine, not a timing claim


def _env(extra: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR",
                "MEGALORA_TEST_PAUSE"):
        env.pop(key, None)
    return {**env, **extra}


def _flags(assets, run: Path, *extra: str) -> list[str]:
    return ["--model", str(assets.model_dir), "--dataset", f"{assets.data_file}#24", "--max_length", "256",
            "--micro_batch_size", "2", "--global_batch_size", "4", "--train_iters", str(STEPS), "--lr", "5e-3",
            "--lr_warmup_iters", "1", "--lora_rank", "4", "--seed", "7", "--torch_dtype", "float64",
            "--lora_dtype", "float64", "--save_interval", "2", "--save", str(run), *extra]


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie waiting to be reaped has exited)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


JOBS: list["Job"] = []


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """A failed test kills what it started (the command; its parent-death signals take the rest)."""
    yield
    while JOBS:
        job = JOBS.pop()
        for pid in _alive(job.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Job:
    """`megalora sft` on 2 ranks in its own session (as a shell starts a command), its output in a
    file, rank 0 told to wait at `pause` (None: run through)."""

    def __init__(self, folder: Path, flags: list[str], pause: str | None):
        self.ctl = folder
        folder.mkdir()
        self.log = folder / "out.log"
        extra = {"NPROC_PER_NODE": "2"}
        if pause:
            extra["MEGALORA_TEST_PAUSE"] = f"{pause}:{folder}"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "megalora", "sft", *flags], env=_env(extra), cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: list[int] = [self.proc.pid]
        self.ranks: dict[int, int] = {}
        JOBS.append(self)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + BOUND_S
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {BOUND_S}s:\n{self.output()[-4000:]}"
            time.sleep(0.1)

    def wait_paused(self) -> None:
        from megalora.train.signals import child_pids

        self.wait_until((self.ctl / "paused").exists, "pause")
        torchrun = child_pids(self.proc.pid)
        ranks = [pid for t in torchrun for pid in child_pids(t)]
        assert len(torchrun) == 1 and len(ranks) == 2, self.output()[-4000:]
        self.pids += torchrun + ranks
        self.ranks = {_rank_of(pid): pid for pid in ranks}

    def release(self) -> None:
        (self.ctl / "go").touch()

    def finish(self) -> tuple[int, str]:
        """The command's exit status and output, once every process of the job has exited."""
        code = self.proc.wait(timeout=BOUND_S)
        deadline = time.monotonic() + BOUND_S
        while _alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        out = self.output()
        assert _alive(self.pids) == [], f"left running: {_alive(self.pids)}\n{out[-4000:]}"
        return code, out


def _signal(job: Job, target: str, sig: signal.Signals, pause: str) -> None:
    """Send `sig` to `target`. A rank's SIGKILL goes to rank 0 (the paused one: mid-step, or writing
    the checkpoint; target "rank 1" names the other). Its SIGTERM/SIGINT inside a save goes to
    rank 1, which waits in a collective for rank 0 and learns of it when the save ends; at a step
    to rank 0, because rank 1 may already have voted on stopping after this step (it would stop
    after the next one)."""
    if target == "rank":
        os.kill(job.ranks[1 if sig != signal.SIGKILL and pause.startswith("save") else 0], sig)
    elif target == "rank 1":
        os.kill(job.ranks[1], sig)
    elif target == "launcher":
        os.kill(job.proc.pid, sig)
    elif target == "group":
        os.killpg(job.proc.pid, sig)
    else:  # every process of the job at once, as systemd stops a service
        for pid in job.pids:
            os.kill(pid, sig)
    if sig != signal.SIGKILL and target != "rank":
        # The launcher says so once the ranks have the signal: only then may rank 0 go on.
        job.wait_until(lambda: f"megalora: {sig.name}: the ranks finish" in job.output(), "forwarded signal")


def _latest(run: Path) -> str | None:
    return (run / "latest").read_text().strip() if (run / "latest").is_file() else None


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path) -> list[int]:
    return [row["step"] for row in _metrics(run)]


def _assert_whole(run: Path, *, partial: str | None = None) -> None:
    """Every checkpoint folder verifies; `latest` names one of them; the only other thing a fault
    may leave is the `.tmp-*` folder of the save it cut short."""
    from megalora.train.run_dir import verify_checkpoint

    assert sorted(p.name for p in run.glob(".tmp-*")) == ([f".tmp-{partial}"] if partial else [])
    for ckpt in run.glob("checkpoint-*"):
        verify_checkpoint(ckpt)
    latest = _latest(run)
    assert latest is None or (run / latest / "meta.json").is_file(), latest


def _assert_equals_reference(run: Path, ref: Path) -> None:
    assert _steps(run) == list(range(1, STEPS + 1)), _steps(run)  # each step once
    ref_loss = {row["step"]: row["loss"] for row in _metrics(ref)}
    for row in _metrics(run):
        assert row["loss"] == pytest.approx(ref_loss[row["step"]], rel=RTOL), row["step"]
    a = load_file(str(ref / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    b = load_file(str(run / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
        assert err <= RTOL, f"{k}: relative error {err:.2e}"
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))


@pytest.fixture(scope="module")
def reference(train_assets, tmp_path_factory):
    """The uninterrupted run every chain of faults must end equal to."""
    folder = tmp_path_factory.mktemp("reference")
    job = Job(folder / "job", _flags(train_assets, folder / "run"), None)
    code, out = job.finish()
    assert code == 0, out[-4000:]
    return folder / "run"


# (target, signal, pause point): each stops at the step it names and saves there.
GRACEFUL = [("rank", signal.SIGTERM, "step-1"), ("launcher", signal.SIGINT, "save-2"),
            ("group", signal.SIGINT, "step-3"), ("rank", signal.SIGINT, "save-4"),
            ("launcher", signal.SIGTERM, "step-5"), ("group", signal.SIGTERM, "save-6"),
            ("every process", signal.SIGTERM, "step-7")]


def test_graceful_stops_save_at_the_stop_and_resume_equals_an_uninterrupted_run(train_assets, reference, tmp_path):
    """SIGTERM/SIGINT to a rank, the command or its group, mid-step or inside a save: the job
    finishes the step (or the save), saves there, every process exits, the command returns 0;
    `--resume latest` after each continues, and the last resume ends equal to the reference."""
    run = tmp_path / "run"
    for i, (target, sig, pause) in enumerate(GRACEFUL):
        flags = _flags(train_assets, run, *(["--resume", "latest"] if i else []))
        job = Job(tmp_path / f"job{i}", flags, pause)
        job.wait_paused()
        _signal(job, target, sig, pause)
        job.release()
        code, out = job.finish()
        case = f"{target} {sig.name} at {pause}:\n{out[-4000:]}"
        stop = int(pause.split("-")[1])
        assert code == 0, case
        received = signal.SIGTERM if target != "rank" else sig  # the launcher forwards SIGTERM
        assert f"stopped by signal {int(received)} after step {stop}" in out, case
        assert _latest(run) == f"checkpoint-{stop}" and _steps(run)[-1] == stop, case
        _assert_whole(run)
    job = Job(tmp_path / "last", _flags(train_assets, run, "--resume", "latest"), None)
    code, out = job.finish()
    assert code == 0 and f"resumed from {run / 'checkpoint-7'} at step 7" in out, out[-4000:]
    _assert_equals_reference(run, reference)


# (target, pause point, whether to resume, the `latest` it leaves, the save it cuts short)
KILLS = [("rank", "step-3", False, "checkpoint-2", None), ("rank", "save-4", True, "checkpoint-2", "checkpoint-4"),
         ("group", "save-4", True, "checkpoint-2", "checkpoint-4"), ("launcher", "step-5", True, "checkpoint-4", None),
         ("group", "step-6", True, "checkpoint-4", None), ("rank 1", "save-6", True, "checkpoint-4", "checkpoint-6")]


def test_kills_leave_no_process_and_resume_from_the_last_complete_checkpoint(train_assets, reference, tmp_path):
    """SIGKILL to a rank (either), the command or its group, mid-step or inside a save: every process of
    the job is gone, the command fails, `latest` names the last complete checkpoint, a save cut
    short is only a `.tmp-*` folder (removed and reported at the next start). Killed inside the
    first save, `--resume latest` is refused in one line. The chain ends equal to the reference."""
    run = tmp_path / "run"
    job = Job(tmp_path / "first", _flags(train_assets, run), "save-2")
    job.wait_paused()
    _signal(job, "launcher", signal.SIGKILL, "save-2")
    code, out = job.finish()
    assert code == -signal.SIGKILL, out[-4000:]
    assert _latest(run) is None
    _assert_whole(run, partial="checkpoint-2")
    r = subprocess.run([sys.executable, "-m", "megalora", "sft", *_flags(train_assets, run, "--resume", "latest")],
                       env=_env({"NPROC_PER_NODE": "2"}), cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.count("\n") == 1, r.stderr  # one line, no launch
    assert "has no `latest` file" in r.stderr and ".tmp-checkpoint-2" in r.stderr, r.stderr

    cut_short = "checkpoint-2"
    for i, (target, pause, resume, latest, partial) in enumerate(KILLS):
        job = Job(tmp_path / f"job{i}", _flags(train_assets, run, *(["--resume", "latest"] if resume else [])), pause)
        job.wait_paused()
        _signal(job, target, signal.SIGKILL, pause)
        if target == "rank 1":
            job.release()  # rank 0 goes on writing, and fails on the peer it no longer has
        code, out = job.finish()
        case = f"{target} SIGKILL at {pause}:\n{out[-4000:]}"
        assert code != 0 and "Traceback" not in out, case
        if cut_short:
            assert f"removed {run / ('.tmp-' + cut_short)}, left by a save that did not finish" in out, case
        assert _latest(run) == latest, case
        _assert_whole(run, partial=partial)
        cut_short = partial
    job = Job(tmp_path / "last", _flags(train_assets, run, "--resume", "latest"), None)
    code, out = job.finish()
    assert code == 0 and f"resumed from {run / 'checkpoint-4'} at step 4" in out, out[-4000:]
    _assert_equals_reference(run, reference)


def test_grace_period_expiry_kills_the_job_and_says_so(train_assets, tmp_path):
    """SIGTERM to the command while a save takes longer than `--stop_grace_period`: the command
    kills every process of the job and returns non-zero with one line naming the last complete
    checkpoint; the cut save is only a `.tmp-*` folder."""
    run = tmp_path / "run"
    job = Job(tmp_path / "job", _flags(train_assets, run, "--stop_grace_period", "1"), "save-4")
    job.wait_paused()
    _signal(job, "launcher", signal.SIGTERM, "save-4")
    code, out = job.finish()  # never released: the save outlasts the grace period
    assert code == 1, out[-4000:]
    errors = [line for line in out.splitlines() if "error" in line]
    assert errors == [f"megalora sft: error: the job did not stop within stop_grace_period=1s: its ranks were "
                      f"killed; the last complete checkpoint is {run / 'checkpoint-2'} (--resume latest continues "
                      "from it)"], out[-4000:]
    assert "Traceback" not in out
    assert _latest(run) == "checkpoint-2"
    _assert_whole(run, partial="checkpoint-4")
