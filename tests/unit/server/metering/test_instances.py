"""Meter instances: a process that is gone is recognised, a live one never is."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from server.metering.instances import Instance, dead


def test_a_live_process_is_not_dead_and_a_finished_one_is() -> None:
    me = Instance.this_process()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = dataclasses.replace(me, id="other", pid=child.pid, pid_start="1")
    assert dead(gone, me, heartbeat_age=0.0, timeout=20.0)  # on this machine, at once
    alive = dataclasses.replace(me, id="twin")  # same process (another meter in it): alive
    assert not dead(alive, me, heartbeat_age=0.0, timeout=20.0)


def test_a_reused_pid_is_not_mistaken_for_the_process_that_held_it() -> None:
    me = Instance.this_process()
    reused = dataclasses.replace(me, id="old", pid_start="12345-not-this-start")
    assert dead(reused, me, heartbeat_age=0.0, timeout=20.0)


def test_another_machine_is_judged_by_its_heartbeat_only() -> None:
    me = Instance.this_process()
    remote = dataclasses.replace(me, id="remote", host="elsewhere", pid=999_999)
    assert not dead(remote, me, heartbeat_age=5.0, timeout=20.0)
    assert dead(remote, me, heartbeat_age=21.0, timeout=20.0)
    assert dead(remote, me, heartbeat_age=None, timeout=20.0)
    assert not dead(me, me, heartbeat_age=None, timeout=20.0)  # never itself
