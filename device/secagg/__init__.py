"""Secure aggregation with dropout recovery (Bonawitz et al. 2017), as pure state machines.

Devices mask their fixed-point updates with pairwise and self masks; the coordinator only ever
learns the sum of the masked vectors of the devices that survived, never one device's update.
The spec is docs/SECAGG.md. Modules: shamir (t-of-n secret sharing), prg (ChaCha20 masks),
crypto (X25519, HKDF, AES-GCM), fixedpoint (the additive encoding), messages (each stage's
payload and its checks), client (a device's side), server (the coordinator's side).
"""

from edgeftl.device.secagg.errors import SecAggError

__all__ = ["SecAggError"]
