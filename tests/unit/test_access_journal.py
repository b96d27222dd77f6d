"""vmmd/access_journal.py: what a successor replays after a crash."""

from bus import protocol as p
from bus.types import IoSpace
from vmmd.access_journal import Access, AccessJournal
from vmmd.devlink import DeviceSpec, ManagedDevice

PIO = IoSpace.PIO


def sent(j, gen, *values, read=False):
    for v in values:
        j.record(j.count(gen), read, PIO, 0x3F9, 1, 0 if read else v)


def writes(values):
    return [Access(False, PIO, 0x3F9, 1, v) for v in values]


def test_a_checkpoint_drops_the_prefix_it_covers():
    j = AccessJournal()
    assert j.begin(1) == []
    sent(j, 1, 10, 11, 12)
    assert j.acknowledge(1, 2) == "" and len(j) == 1
    assert j.begin(2) == writes([12])


def test_accesses_from_another_incarnation_are_not_counted_or_acknowledged():
    j = AccessJournal()
    j.begin(2)
    sent(j, 1, 5)                       # a vCPU still holding the dead incarnation
    assert j.sent == 0 and len(j) == 0
    sent(j, 2, 6)
    assert j.acknowledge(1, 1) == "" and len(j) == 1   # a stale checkpoint changes nothing


def test_a_device_cannot_claim_more_than_it_was_sent():
    j = AccessJournal()
    j.begin(1)
    sent(j, 1, 1, 2)
    assert "claims 3 accesses applied, vmmd sent 2" in j.acknowledge(1, 3)
    assert len(j) == 2


def test_an_unanswered_read_is_counted_but_not_replayed():
    j = AccessJournal()
    j.begin(1)
    j.count(1)                          # sent, no reply: the vCPU retries it on the successor
    sent(j, 1, 7)
    assert j.begin(2) == writes([7])


def test_past_the_limit_nothing_is_replayed_until_a_checkpoint_covers_the_loss():
    j = AccessJournal(limit=3)
    j.begin(1)
    sent(j, 1, *range(1, 6))            # 5 sent, the first 2 dropped
    assert j.acknowledge(1, 1) == ""
    assert j.begin(2) is None           # access 2 is lost: no partial replay
    sent(j, 2, *range(1, 6))
    assert j.acknowledge(2, 3) == ""    # covers the loss (1..2)
    assert j.begin(3) == writes([4, 5])


def test_a_failed_successor_hands_the_same_replay_to_the_next():
    j = AccessJournal()
    j.begin(1)
    sent(j, 1, 1, 2)
    pending = j.begin(2)
    sent(j, 2, 1)                       # part of the replay, then the successor died
    j.put_back(pending)
    assert j.begin(3) == writes([1, 2])
    j.put_back(None)
    assert j.begin(4) is None


def test_save_while_paused_covers_everything():
    j = AccessJournal()
    j.begin(1)
    sent(j, 1, 1, 2, read=True)
    j.acknowledge_all(1)
    assert j.begin(2) == []


class RecordingSupervisor:
    """Just what Supervisor._handle_event needs for a CHECKPOINT."""
    from vmmd.supervisor import Supervisor
    _handle_event = Supervisor._handle_event


def test_a_checkpoint_claiming_unsent_accesses_is_refused_and_not_kept():
    dev = ManagedDevice(DeviceSpec(id="lpc", kind="lpc", options={}), 1.0, "off")
    dev.generation = 1
    dev.journal.begin(1)
    sent(dev.journal, 1, 1)
    RecordingSupervisor()._handle_event(dev, p.Checkpoint({"x": 1}, 1))
    assert dev.last_checkpoint == {"x": 1}
    RecordingSupervisor()._handle_event(dev, p.Checkpoint({"x": 2}, 9))
    assert dev.last_checkpoint == {"x": 1} and dev.refused == {"checkpoint": 1}


def test_a_checkpoint_can_come_before_the_sender_records_its_access():
    # The device handled the write and checkpointed before the vCPU thread
    # got back to record it: covered, so never replayed.
    j = AccessJournal()
    j.begin(1)
    index = j.count(1)
    assert j.acknowledge(1, 1) == ""
    j.record(index, False, PIO, 0x3F9, 1, 5)
    assert len(j) == 0 and j.begin(2) == []


def test_an_access_that_never_left_is_uncounted():
    j = AccessJournal()
    j.begin(1)
    sent(j, 1, 1)
    j.uncount(j.count(1))               # the send failed
    assert j.sent == 1
    assert "claims 2" in j.acknowledge(1, 2)
