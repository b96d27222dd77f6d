"""bus.pci_info: a device's PCI declaration is validated (hostile inputs)."""

import copy

import pytest

from bus.pci_info import PciInfoError, parse_pci_info, to_wire

GOOD = {
    "bars": [[0, 0x4000, "mem64"], [2, 0x20, "io"], [4, 0x1000, "mem32"]],
    "msix": {"cap": 0x40, "vectors": 3, "table": [0, 0x1000], "pba": [0, 0x2000]},
    "notify": {"bar": 0, "offset": 0x3000, "multiplier": 4, "queues": 2},
    "intx_pin": 1,
}


def with_(path, value):
    d = copy.deepcopy(GOOD)
    obj = d
    for k in path[:-1]:
        obj = obj[k]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


def test_good_declaration_round_trips():
    info = parse_pci_info(GOOD)
    assert info.vectors == 3 and info.queues == 2 and info.intx_pin == 1
    assert info.bar(0).is_64 and info.bar(2).is_io and info.bar(1) is None
    assert info.msix.table_size == 48 and info.msix.pba_size == 8
    assert info.notify.queue_offset(1) == 0x3004
    assert parse_pci_info(to_wire(info)) == info
    assert parse_pci_info({"bars": [], "msix": None, "notify": None, "intx_pin": 0}).vectors == 0


BAD = {
    "not a map": [1, 2],
    "missing key": with_(["intx_pin"], KeyError),
    "extra key": {**GOOD, "extra": 1},
    "bars not a list": with_(["bars"], {"0": 1}),
    "too many bars": with_(["bars"], [[i, 16, "mem32"] for i in range(6)] + [[0, 16, "io"]]),
    "bar index 6": with_(["bars"], [[6, 16, "mem32"]]),
    "bar index negative": with_(["bars"], [[-1, 16, "mem32"]]),
    "bar index bool": with_(["bars"], [[True, 16, "mem32"]]),
    "size not a power of two": with_(["bars"], [[0, 0x3000, "mem32"]]),
    "size zero": with_(["bars"], [[0, 0, "mem32"]]),
    "mem size too small": with_(["bars"], [[0, 8, "mem32"]]),
    "io too big": with_(["bars"], [[0, 512, "io"]]),
    "mem32 too big": with_(["bars"], [[0, 1 << 32, "mem32"]]),
    "mem64 absurd": with_(["bars"], [[0, 1 << 62, "mem64"]]),
    "bad kind": with_(["bars"], [[0, 16, "rom"]]),
    "mem64 in slot 5": with_(["bars"], [[5, 16, "mem64"]]),
    "mem64 overlaps next slot": with_(["bars"], [[0, 0x4000, "mem64"], [1, 16, "mem32"]]),
    "duplicate index": with_(["bars"], [[2, 16, "io"], [2, 16, "io"]]),
    "float size": with_(["bars"], [[0, 16.0, "mem32"]]),
    "vectors zero": with_(["msix", "vectors"], 0),
    "vectors too many": with_(["msix", "vectors"], 2049),
    "cap in header": with_(["msix", "cap"], 0x10),
    "cap unaligned": with_(["msix", "cap"], 0x42),
    "cap past the end": with_(["msix", "cap"], 0xFC),
    "table in io bar": with_(["msix", "table"], [2, 0]),
    "table in undeclared bar": with_(["msix", "table"], [3, 0]),
    "table outside bar": with_(["msix", "table"], [0, 0x3FF0]),
    "table unaligned": with_(["msix", "table"], [0, 0x1004]),
    "pba overlaps table": with_(["msix", "pba"], [0, 0x1020]),
    "pba outside bar": with_(["msix", "pba"], [4, 0x1000]),
    "table overlaps notify": with_(["msix", "table"], [0, 0x3000]),
    "msix bad shape": with_(["msix", "table"], [0]),
    "queues zero": with_(["notify", "queues"], 0),
    "queues too many": with_(["notify", "queues"], 1025),
    "notify outside bar": with_(["notify", "offset"], 0x3FFE),
    "notify span outside bar": with_(["notify"], {"bar": 0, "offset": 0x3000, "multiplier": 8, "queues": 1024}),
    "notify in io bar": with_(["notify", "bar"], 2),
    "multiplier not pow2": with_(["notify", "multiplier"], 6),
    "multiplier too big": with_(["notify", "multiplier"], 8192),
    "notify offset odd": with_(["notify", "offset"], 0x3001),
    "intx pin 5": with_(["intx_pin"], 5),
    "intx pin str": with_(["intx_pin"], "1"),
}


@pytest.mark.parametrize("decl", BAD.values(), ids=BAD.keys())
def test_hostile_declarations_are_refused(decl):
    with pytest.raises(PciInfoError):
        parse_pci_info(decl)
