"""The `edgeftl` console script: one entry point, one module per subcommand.

It lives in `device/` because that is the package every role installs. Only the chosen
subcommand's module is imported, so `edgeftl device run` on a board loads the device's room
alone: never `edgeftl.coordinator`, the build step or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "build": ("edgeftl.coordinator.cli.build",
              "build a training bundle (stock ONNX Runtime) from a local pretrained model (host)"),
    "inspect": ("edgeftl.coordinator.cli.inspect", "show a bundle's manifest, files and trainable parameters"),
    "device": ("edgeftl.device.cli.device", "on-device commands: train, plan, run, supervise (torch-free)"),
    "coordinator": ("edgeftl.coordinator.cli.coordinator", "run federated rounds through an MQTT broker"),
    "simulate": ("edgeftl.coordinator.cli.simulate",
                 "a whole federation on this machine (real broker, real processes)"),
    "report": ("edgeftl.coordinator.cli.report", "write report.html with plots of a run (or several, overlaid)"),
    "certs": ("edgeftl.coordinator.cli.certs",
              "make a CA, certificates, signing keys, MQTT passwords and an allowlist; pin a bundle's coordinator key"),
    "broker-config": ("edgeftl.coordinator.cli.broker_config",
                      "write a mosquitto.conf with TLS, passwords and per-device ACLs for `edgeftl certs` output"),
    "package": ("edgeftl.coordinator.cli.package",
                "one archive per platform with the device runtime, its wheels and a bundle, for `edgeftl flash`"),
    "flash": ("edgeftl.coordinator.cli.flash",
              "install a package on boards over SSH, check its memory plan fits, start the agent as a service"),
    "fleet": ("edgeftl.coordinator.cli.fleet",
              "see the devices on a broker: platform, bundle, runtime versions, last round, peak memory, online"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="edgeftl", description="Federated fine-tuning of foundation models "
                                     "on edge devices: build a bundle, train on devices, federate over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    for name, (path, help_text) in SUBCOMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)  # listed in --help; its flags load only when chosen
            continue
        module = importlib.import_module(path)
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    if module is None:  # unreachable: argparse refuses an unknown or missing command first
        parser.error(f"choose a command: {', '.join(SUBCOMMANDS)}")
    return int(module.run(args) or 0)
