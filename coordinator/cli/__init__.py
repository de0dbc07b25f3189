"""The host and gateway subcommands of `edgeftl` (build, inspect, coordinator, simulate, report).

The console script itself is `edgeftl.device.cli.main`, which imports one of these modules only
when its subcommand is chosen.
"""
