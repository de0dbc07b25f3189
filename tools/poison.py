"""A poisoning device for benchmarks and tests: a real device agent whose trained update is
transformed on its way out. Not part of `device/`: nothing a real deployment installs can attack.

    python tools/poison.py --scale 50 --samples 1000000 -- --broker mqtt://... --bundle B --data D --id dev03

The agent trains on its own data exactly as an honest one; only the Update it sends differs: its
delta multiplied by `scale` (50: a boosted update; -5: sign-flipped and boosted) and, when given,
its sample count replaced by `samples` (FedAvg weights by it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.messages import Update
from edgeftl.device.protocol.wire import FORMAT_VERSION


@dataclass(frozen=True)
class Attack:
    """How an attacker rewrites its honest update."""

    scale: float = 1.0  # multiplies the trained delta
    samples: int | None = None  # the sample count claimed; None = the true one

    def apply(self, update: Update) -> Update:
        codec = parse_codec(update.vector.codec)
        vector = codec.encode(codec.decode(update.vector) * self.scale)
        return dataclasses.replace(update, vector=vector, samples=self.samples or update.samples)

    def label(self) -> str:
        return f"x{self.scale:g}" + (f", samples={self.samples}" if self.samples else "")


class PoisonedLink:
    """A device link whose outgoing Updates go through `attack`; everything else is the link's own."""

    def __init__(self, link, attack: Attack) -> None:
        self._link, self.attack = link, attack

    def send(self, message: object, version: int = FORMAT_VERSION) -> int:
        if isinstance(message, Update):
            message = self.attack.apply(message)
        return self._link.send(message, version)  # in the message version the task asked for, as Link.send

    def __getattr__(self, name: str):
        return getattr(self._link, name)


def poison(agent, attack: Attack):
    """The agent, now sending its updates through `attack`."""
    agent.link = PoisonedLink(agent.link, attack)
    return agent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, _, theirs = (argv[: argv.index("--")], "--", argv[argv.index("--") + 1:]) if "--" in argv else (argv, "", [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplier of the trained delta")
    parser.add_argument("--samples", type=int, default=None, help="sample count to claim (default: the true one)")
    attack_args = parser.parse_args(ours)
    from edgeftl.device.cli.run import add_run, make_agent, serve

    run_parser = argparse.ArgumentParser(prog="poison.py ... --")
    add_run(run_parser)
    args = run_parser.parse_args(theirs)
    attack = Attack(attack_args.scale, attack_args.samples)
    print(f"{args.id}: attacking with {attack.label()}", file=sys.stderr)
    serve(poison(make_agent(args), attack), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
