"""The demo's exit watch: a process whose exit waits for a thread that never ends
still ends, with the demo's exit code, and says where it was held."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HELD = textwrap.dedent(
    """
    import threading
    from agent.fleet.demo import watch_exit

    def held_forever_in_this_function():
        threading.Event().wait()

    threading.Thread(target=held_forever_in_this_function, name="stuck").start()
    watch_exit(3, wait=0.5)
    """
)


def test_an_exit_held_by_a_thread_ends_with_the_code_and_the_stacks() -> None:
    res = subprocess.run(
        [sys.executable, "-c", HELD], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 3, res.stderr
    assert "still not exited 0.5 s after cleaning up" in res.stderr
    assert "held_forever_in_this_function" in res.stderr


def test_a_clean_exit_is_not_held() -> None:
    code = "from agent.fleet.demo import watch_exit\nwatch_exit(0, wait=30)\n"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )
    assert res.returncode == 0
    assert res.stderr == ""
