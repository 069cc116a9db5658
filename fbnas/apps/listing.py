"""`fbnas list spaces|devices|ops`: what ships with fbnas (and what a device=, space= or op name may be)."""
from __future__ import annotations

import sys
import textwrap

from ..errors import FbnasError
from .common import run_plain

WHAT = ("spaces", "devices", "ops")


def list_spaces() -> None:
    from ..space import available_spaces, load_space

    print(f"{'space':<16} {'input':<9} {'classes':>7} {'layers':>6} {'ops':>4}  bits (w / a)  description")
    for name in available_spaces():
        s = load_space(name)
        bits = f"{','.join(map(str, s.w_bits))} / {','.join(map(str, s.a_bits))}"
        print(f"{name:<16} {f'{s.in_channels}x{s.input_size}x{s.input_size}':<9} {s.num_classes:>7} "
              f"{s.num_layers:>6} {len(s.candidates):>4}  {bits:<12}  {textwrap.shorten(s.description, 72)}")


def list_devices() -> None:
    from ..latency.devices import describe_devices, load_device

    print(f"{'device':<14} {'type':<14} {'threads':>7}  description")
    for name, desc in describe_devices():
        try:
            dev = load_device(name)
            kind, threads = dev.type, dev.threads
        except FbnasError:
            kind, threads = "?", "?"
        print(f"{name:<14} {kind:<14} {threads:>7}  {desc}")


def list_ops() -> None:
    from ..blocks import get_op, known_ops

    print(f"{'op':<14} {'family':<14} parameters")
    for name in known_ops():
        op = get_op(name)
        params = " ".join(f"{k}={v}" for k, v in op.params.items())
        print(f"{name:<14} {op.family:<14} {params}")


HANDLERS = {"spaces": list_spaces, "devices": list_devices, "ops": list_ops}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) != 1 or argv[0] not in WHAT:
        got = " ".join(argv) or "nothing"
        print(f"fbnas: error: 'fbnas list' takes one of {' | '.join(WHAT)}, got {got!r}", file=sys.stderr)
        return 2
    return run_plain(HANDLERS[argv[0]])
