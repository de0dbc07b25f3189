"""A device's side of secure aggregation: one object per round, driven stage by stage.

    client = SecAggClient("dev-3", crypto.context(run_id, round, bundle_sha256))
    send(client.advertise())                 # stage 0
    send(client.share(roster))               # stage 1, once the roster arrives
    client.receive(ciphertexts)              # the shares addressed to this device
    send(client.mask(update, samples))       # stage 2
    send(client.unmask(survivors))           # stage 3

Every method checks what the coordinator sent before acting on it and raises SecAggError (one
line) otherwise; a device never answers a stage twice, so it never reveals both secrets of a peer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from edgeftl.device.secagg import crypto, masking, shamir
from edgeftl.device.secagg.errors import SecAggError
from edgeftl.device.secagg.messages import Advertise, Ciphertexts, Masked, Roster, Shares, Survivors, Unmask

_ORDER = ("advertise", "share", "receive", "mask", "unmask", "done")  # "failed" after a refused stage


class SecAggClient:
    """One device's secure-aggregation state for one round."""

    def __init__(self, device_id: str, ctx: bytes, sign: Callable[[bytes], bytes] | None = None,
                 verify: Callable[[str, bytes, bytes], bool] | None = None) -> None:
        """`sign(data)` signs with this device's identity key; `verify(device_id, data, signature)` checks a
        member's signature (the "auth" allowlist's key for that id). Without them keys are unauthenticated."""
        self.device_id, self.ctx, self.verify = device_id, ctx, verify
        self.c_sk, self.s_sk, self.b = crypto.new_private(), crypto.new_private(), os.urandom(shamir.SECRET_BYTES)
        keys = Advertise(crypto.public_of(self.c_sk), crypto.public_of(self.s_sk), hashlib.sha256(self.b).digest())
        self._advertised = replace(keys, signature=sign(keys.signed_part(ctx, device_id))) if sign else keys
        self.roster: Roster | None = None
        self.held: dict[str, tuple[int, int]] = {}  # owner -> (share of its s_sk, share of its b) at my point
        self.next, self._following = "advertise", "advertise"

    def advertise(self) -> Advertise:
        self._step("advertise")
        self._done()
        return self.advertised()

    def share(self, roster: Roster) -> Shares:
        """Split s_sk and b t-of-n over the roster and seal each member's pair of shares for it."""
        self._step("share")
        self._check_roster(roster)
        self.roster = roster
        points = {m.device_id: roster.point(m.device_id) for m in roster.members}
        t = roster.params.threshold
        s_shares = shamir.split(self.s_sk, t, list(points.values()))
        b_shares = shamir.split(self.b, t, list(points.values()))
        sealed = {}
        for member in roster.members:
            x = points[member.device_id]
            if member.device_id == self.device_id:
                self.held[self.device_id] = (s_shares[x], b_shares[x])
                continue
            key = crypto.agree(self.c_sk, member.keys.c_pk, crypto.SHARE_KEY_LABEL, self.ctx)
            plaintext = shamir.share_bytes(s_shares[x]) + shamir.share_bytes(b_shares[x])
            sealed[member.device_id] = crypto.seal(key, plaintext, crypto.pair_aad(self.ctx, self.device_id,
                                                                                    member.device_id))
        self._done()
        return Shares(sealed)

    def receive(self, ciphertexts: Ciphertexts) -> None:
        """Open the shares other devices sealed for me; their senders are the devices that shared (U2)."""
        self._step("receive")
        roster = self._roster()
        keys = {m.device_id: m.keys for m in roster.members}
        senders = set(ciphertexts.sealed)
        if self.device_id in senders or not senders <= set(keys):
            raise SecAggError("bad ciphertexts: a sender outside the roster, or this device itself")
        if len(senders) + 1 < roster.params.threshold:
            raise SecAggError(f"too few devices: {len(senders) + 1} shared, the threshold is {roster.params.threshold}")
        for sender, sealed in ciphertexts.sealed.items():
            key = crypto.agree(self.c_sk, keys[sender].c_pk, crypto.SHARE_KEY_LABEL, self.ctx)
            plain = crypto.open_sealed(key, sealed, crypto.pair_aad(self.ctx, sender, self.device_id))
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggError(f"bad share: {len(plain)} bytes from {sender!r}, expected {2 * shamir.SHARE_BYTES}")
            half = shamir.SHARE_BYTES
            self.held[sender] = (shamir.share_value(plain[:half]), shamir.share_value(plain[half:]))
        self._done()

    def mask(self, update: np.ndarray, samples: int) -> Masked:
        """y = q(w * clip(update)) | w, masked with PRG(b) and a pairwise mask per device that shared."""
        self._step("mask")
        roster = self._roster()
        if np.asarray(update).shape != (roster.params.size,):
            raise SecAggError(f"wrong size: update has shape {np.asarray(update).shape}, "
                              f"the round expects ({roster.params.size},)")
        fixed = roster.params.fixed
        vector = fixed.encode(update, fixed.weight(samples))
        keys = {m.device_id: m.keys.s_pk for m in roster.members}
        others = {d: keys[d] for d in self.held if d != self.device_id}
        masked = Masked(masking.mask(vector, self.device_id, self.b, self.s_sk, others, self.ctx))
        self._done()
        return masked

    def unmask(self, survivors: Survivors) -> Unmask:
        """Shares of b for every survivor, of s_sk for every device that shared but sent no masked vector."""
        self._step("unmask")
        shared, alive = set(self.held), set(survivors.devices)
        if self.device_id not in alive or not alive <= shared:
            raise SecAggError("bad survivors: must include this device and only devices that shared keys")
        if len(alive) < self._roster().params.threshold:
            raise SecAggError(f"too few survivors: {len(alive)}, the threshold is {self._roster().params.threshold}")
        self._done()
        return Unmask({u: shamir.share_bytes(self.held[u][1]) for u in sorted(alive)},
                      {gone: shamir.share_bytes(self.held[gone][0]) for gone in sorted(shared - alive)})

    # ---- checks -----------------------------------------------------------------------------
    def _step(self, stage: str) -> None:
        """Enter `stage`; until `_done` the device counts as failed, so a refused message ends its round."""
        if self.next != stage:
            raise SecAggError(f"wrong stage: {stage} while this device expects {self.next}")
        self.next = "failed"
        self._following = _ORDER[_ORDER.index(stage) + 1]

    def _done(self) -> None:
        self.next = self._following

    def _roster(self) -> Roster:
        assert self.roster is not None  # _step orders the stages
        return self.roster

    def _check_roster(self, roster: Roster) -> None:
        ids, n, t = roster.ids(), len(roster.members), roster.params.threshold
        mine = [m for m in roster.members if m.device_id == self.device_id]
        if not mine or mine[0].keys != self.advertised():
            raise SecAggError("bad roster: this device is missing or listed with keys it did not advertise")
        if not n // 2 + 1 <= t <= n or t < 2:
            raise SecAggError(f"bad roster: threshold {t} for {n} devices; accepted: a majority, at least 2")
        if n > roster.params.fixed.max_devices:
            raise SecAggError(f"bad roster: {n} devices, the encoding has room for {roster.params.fixed.max_devices}")
        if self.verify is not None:
            for m in roster.members:
                if not m.keys.signature or not self.verify(m.device_id, m.keys.signed_part(self.ctx, m.device_id),
                                                           m.keys.signature):
                    raise SecAggError(f"bad roster: the keys of {m.device_id!r} are not signed by its device key")
        c_keys, s_keys = {m.keys.c_pk for m in roster.members}, {m.keys.s_pk for m in roster.members}
        if len(c_keys) != n or len(s_keys) != n or len(set(ids)) != n:
            raise SecAggError("bad roster: two members share an id or a public key")

    def advertised(self) -> Advertise:
        return self._advertised
