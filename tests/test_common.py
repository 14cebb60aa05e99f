"""pipelines.common: the retry policy of the stages' I/O tasks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from pipelines.common import IO_RETRIES


def test_io_tasks_retry_on_os_errors_only(prefect_harness):
    calls = {"io": 0, "bug": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky_write() -> str:
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("disk hiccup")
        return "written"

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def buggy() -> None:
        calls["bug"] += 1
        raise ValueError("a bug: retrying cannot help")

    @flow
    def run() -> str:
        return flaky_write()

    @flow
    def run_bug() -> None:
        buggy()

    assert run() == "written" and calls["io"] == 3  # two retries, then success
    with pytest.raises(ValueError):
        run_bug()
    assert calls["bug"] == 1  # no retry for a non-I/O error


def test_a_bad_annotation_file_is_one_line_without_tracebacks(tmp_path: Path, prefect_harness) -> None:
    """#13: the annotation error used to come with ~75 lines of Prefect tracebacks before the clean line. The stage
    reports to the session's Prefect server (without one it would start a temporary server of its own, ~7 s)."""
    from prefect.settings import PREFECT_API_URL

    bad = tmp_path / "msrvtt.json"
    bad.write_text('{"videos": [{"video_id": "v1"}], "sentences": 5}')
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)]),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    proc = subprocess.run([sys.executable, "-m", "pipelines.tokenize", "--params", str(repo / "params.yaml"),
                           "--video-captions", str(bad), "--video-captions-format", "msrvtt", "--activity-dir", "",
                           "--image-captions-dir", "",
                           "--out", str(tmp_path / "tokens")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert f"tokenize: error: {bad}: top level.sentences: expected list, got 5" in output
    assert "Traceback" not in output, output


def test_exit_fast_keeps_what_a_normal_exit_does(tmp_path: Path) -> None:
    """exit_fast skips the interpreter's teardown but not the exit's duties: a non-daemon thread finishes, exit
    handlers run, buffered output reaches the pipe, and the status is the one given."""
    import textwrap

    script = textwrap.dedent(f"""
        import atexit, concurrent.futures, pathlib, sys, threading, time
        from pipelines.common import exit_fast
        out = pathlib.Path({str(tmp_path)!r})
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        # An executor nobody shut down (MLflow and Prefect leave some): its idle worker threads are non-daemon and
        # end only when told to at exit; joining them first hung the report stage (2026-12-04).
        idle = concurrent.futures.ThreadPoolExecutor(2)
        idle.submit(time.sleep, 0.01).result()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("buffered, no newline")
        exit_fast(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"


def test_a_stage_waits_for_the_server_started_beside_it_and_names_its_log_when_it_dies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/with-prefect-server starts its server beside the command: a stage waits for /health before its
    work, and a server that died makes the stage fail at once, naming the server's log."""
    import http.server
    import threading

    from pipelines.common import SERVER_LOG_ENV, SERVER_PID_ENV, StageFailed, run_main, wait_for_prefect_server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler API
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    # A port nothing listens on yet: the server "starts" 0.5 s after the stage begins to wait.
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    server.server_close()
    log = tmp_path / "server.log"
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setenv(SERVER_LOG_ENV, str(log))
    monkeypatch.setenv(SERVER_PID_ENV, str(os.getpid()))  # alive throughout

    def start_late() -> None:
        import time
        time.sleep(0.5)
        late = http.server.HTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=late.serve_forever, daemon=True).start()
        started.append(late)

    started: list = []
    threading.Thread(target=start_late, daemon=True).start()
    assert run_main("demo", lambda: 0 if started else 7, lifeline=False) == 0  # the work ran after /health
    started[0].shutdown()
    started[0].server_close()

    # The server exited (a reaped child here) before answering: the stage stops at once and names the log.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv(SERVER_PID_ENV, str(dead.pid))
    with pytest.raises(StageFailed, match=f"exited before it answered; see {log}"):
        wait_for_prefect_server(timeout_s=60)
    # Without the wrapper's variables there is nothing to wait for.
    monkeypatch.delenv(SERVER_LOG_ENV)
    wait_for_prefect_server(timeout_s=0)


def test_a_stage_runs_its_flow_without_heartbeats_unless_the_user_set_their_frequency() -> None:
    """A flow run's end waits for its heartbeat thread's 1-s sleep (0.66 s a stage, docs/benchmarks.md): run_main
    turns Prefect's default heartbeats off for the stage's work and restores them after it; a frequency the user
    set (environment, profile, or settings in code) is kept. In fresh processes: Prefect reads the environment at
    import, and the test session's harness sets the frequency itself."""
    import textwrap

    script = textwrap.dedent("""
        import prefect
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
        from pipelines.common import run_main
        seen = []
        def work():
            seen.append(get_current_settings().flows.heartbeat_frequency)
            return 0
        run_main("demo", work, lifeline=False)
        seen.append(get_current_settings().flows.heartbeat_frequency)
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
            run_main("demo", work, lifeline=False)
        print(seen)
    """)
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT_FREQUENCY" not in k}
    default = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert default.returncode == 0, default.stderr
    assert default.stdout.strip() == "[None, 180, 60]"  # off in the work, Prefect's default after it, kept when set
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "45"
    chosen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == "[45, 45, 60]"
