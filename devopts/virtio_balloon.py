"""virtio-balloon slot options: `-s N,virtio-balloon[,stats_interval=S][,deflate_on_oom=on|off]
[,reporting=on|off][,must_tell_host=on|off][,queue_size=N]`."""

from __future__ import annotations

from devopts import Opt, on_off, parse_table, power_of_two, seconds

DEFAULT_STATS_INTERVAL = 5.0
MAX_INTERVAL = 86400.0
DEFAULT_QUEUE_SIZE = 256

OPTIONS = (
    Opt("stats_interval", "stats_interval", seconds(0.0, MAX_INTERVAL)),
    Opt("deflate_on_oom", "deflate_on_oom", on_off),
    Opt("reporting", "reporting", on_off),
    Opt("must_tell_host", "must_tell_host", on_off),
    Opt("queue_size", "queue_size", power_of_two(4, 1024)),
)
_DEFAULTS = {"stats_interval": DEFAULT_STATS_INTERVAL, "deflate_on_oom": True, "reporting": True,
             "must_tell_host": False, "queue_size": DEFAULT_QUEUE_SIZE}


def parse(args) -> dict:
    """The slot's arguments -> {stats_interval, deflate_on_oom, reporting, must_tell_host,
    queue_size}, or OptionError."""
    return parse_table("virtio-balloon", OPTIONS, args, _DEFAULTS)
