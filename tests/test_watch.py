"""cap_train/watch.py's verdicts without processes: a store held in a dict, the clock moved by hand.

The race these pin down (seen in the suite under load): rank 1 is SIGSTOPped; rank 0 stops hearing its
beats, names it after the collective timeout and exits, taking the rendezvous store with it. Rank 0 counts
the silence from the last beat it saw, up to two beats before rank 1 stopped, so rank 1, continued, may find
it was paused for a little less than the limit. It must then end quietly, not name rank 0."""

from __future__ import annotations

import pytest

from cap_train import watch
from cap_train.logs import EXIT_PEER_LOST, EXIT_PEER_NAMED

LIMIT = 30.0


class Ended(Exception):
    def __init__(self, code: int):
        self.code = code


class Store:
    """The store calls Watch makes (add, check, get, set); `down` makes every call fail, as when the
    store's host (rank 0) is gone."""

    def __init__(self):
        self.values: dict[str, object] = {}
        self.down = False

    def _up(self):
        if self.down:
            raise RuntimeError("Connection reset by peer")

    def add(self, key, n):
        self._up()
        self.values[key] = int(self.values.get(key, 0)) + n
        return self.values[key]

    def check(self, keys):
        self._up()
        return all(k in self.values for k in keys)

    def get(self, key):
        self._up()
        return str(self.values[key]).encode()

    def set(self, key, value):
        self._up()
        self.values[key] = value


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(watch.time, "monotonic", lambda: now[0])
    return now


def make(rank: int, store: Store, lines: list) -> watch.Watch:
    w = watch.Watch(store, rank, ["nodeA", "nodeB"], LIMIT, lambda line: lines.append(("say", line)), lines.append)

    def end(code):
        raise Ended(code)

    w._exit = end
    w._publish = lambda kind, verdict=None: None
    return w


def beat_once(w: watch.Watch) -> None:
    """One pass of the beater thread."""
    real_wait = w._done.wait
    w._done.wait = lambda timeout=None: w._done.set()
    try:
        w._beat()
    finally:
        w._done.clear()
        w._done.wait = real_wait


@pytest.mark.parametrize("paused", [LIMIT - 8, LIMIT - 2])
def test_a_rank_paused_nearly_the_limit_ends_quietly_when_the_store_host_is_gone(clock, paused):
    store, lines = Store(), []
    w = make(1, store, lines)
    store.add("beat/0", 1)
    beat_once(w)
    clock[0] += paused  # SIGSTOP … SIGCONT
    store.down = True  # rank 0 named this rank and exited, with the store
    w._check_own_pause()
    beat_once(w)
    clock[0] += watch.GONE_BEATS * watch.BEAT_S + 1
    with pytest.raises(Ended) as e:
        w._decide(0, "no heartbeat since a collective failed")
    assert e.value.code == EXIT_PEER_LOST
    assert not [line for line in lines if isinstance(line, tuple)], lines  # nothing on the console
    assert "this rank was paused for" in lines[-1]


def test_a_rank_paused_past_the_limit_ends_quietly_at_once(clock):
    store, lines = Store(), []
    w = make(1, store, lines)
    clock[0] += LIMIT + 1
    with pytest.raises(Ended) as e:
        w._check_own_pause()
    assert e.value.code == EXIT_PEER_LOST and "paused for 31 s" in lines[-1]


def test_after_a_long_pause_a_rank_seen_again_and_then_silent_is_named(clock):
    """The pause exemption lasts until the watched rank shows it is alive: a later silence is a real fault."""
    store, lines = Store(), []
    w = make(0, store, lines)
    store.add("beat/1", 1)
    beat_once(w)
    clock[0] += LIMIT - 2
    w._check_own_pause()
    store.add("beat/1", 1)  # rank 1 beats on: the others did not end the run
    beat_once(w)
    clock[0] += LIMIT + 1
    with pytest.raises(Ended) as e:
        w._decide(1, "no heartbeat for 30 s")
    assert e.value.code == EXIT_PEER_NAMED
    assert lines[-1][0] == "say" and lines[-1][1].startswith("cap-train: rank 1 on nodeB stopped answering (")


def test_a_short_pause_does_not_excuse_a_silent_rank(clock):
    """Paused well within the limit (no other rank can have given up on this one): a rank that then goes
    silent is named, by rank 1 when it is rank 0."""
    store, lines = Store(), []
    w = make(1, store, lines)
    clock[0] += LIMIT - watch.LATE_S - 1
    w._check_own_pause()
    store.down = True
    clock[0] += LIMIT + 1
    with pytest.raises(Ended) as e:
        w._decide(0, "no heartbeat for 30 s")
    assert e.value.code == EXIT_PEER_NAMED and lines[-1][1].startswith("cap-train: rank 0 on nodeA stopped")


def test_a_killed_rank_whose_last_beat_is_seen_late_is_named(clock, monkeypatch):
    """Rank 1 is killed just after a beat; the collective fails at once, but rank 0's beater sees that last
    beat only on its next poll, a beat later. Its silence counts from then, so rank 0 must keep looking for
    GONE_BEATS beats after that, not give up and blame the collective (seen in the suite under load)."""
    store, lines = Store(), []
    w = make(0, store, lines)
    store.add("beat/1", 1)
    beat_once(w)
    store.add("beat/1", 1)  # rank 1's last beat, just before SIGKILL; not yet seen by rank 0
    failed_at = clock[0]

    def sleep(seconds):  # the main thread's waits; the judge and the beater run beside them
        clock[0] += seconds
        w._check_own_pause()
        if clock[0] - failed_at >= watch.BEAT_S:
            beat_once(w)

    monkeypatch.setattr(watch.time, "sleep", sleep)
    with pytest.raises(Ended) as e:
        w.explain(RuntimeError("Connection closed by peer"))
    assert e.value.code == EXIT_PEER_NAMED
    assert lines[-1][1].startswith("cap-train: rank 1 on nodeB stopped answering (no heartbeat since"), lines
