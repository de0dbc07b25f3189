"""LoRA (Hu et al., 2021): y = W x + (alpha / r) * B (A x), with W frozen and A, B trained.

Two variants train fewer values per adapted layer, so every update a device sends is smaller:
- lora-fa (LoRA-FA, Zhang et al. 2023; FFA-LoRA, Sun et al. 2024 for federated learning): A keeps its
  random initialisation, frozen, and only B trains: r * out values instead of r * (in + out). Every
  device holds the bundle's A, so FedAvg's mean of B is the exact mean of the products B A.
- lora-xs (LoRA-XS, Balazy et al. 2024): A and B are frozen at the layer's top-r singular vectors
  (B = U_r S_r, A = V_r^T of the pretrained W) and an r x r core R, zero at start, trains between
  them: y = W x + (alpha / r) * B R (A x). r * r values per layer (64 at r = 8, against 6,144 for
  LoRA on a 384 x 384 projection); the mean of R is exact as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgeftl.device.protocol.manifest import LORA, LORA_FA, LORA_KINDS, LORA_XS, LoraFactor


@dataclass
class LoraConfig:
    """Which linear layers get adapters, and their shape."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # module-name suffixes, e.g. ("query", "value"); () = family default
    dropout: float = 0.0
    variant: str = LORA  # one of LORA_KINDS

    def __post_init__(self) -> None:
        if self.variant not in LORA_KINDS:
            raise ValueError(f"unknown LoRA variant {self.variant!r}; accepted: {', '.join(LORA_KINDS)}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = tuple(self.targets)


class LoraLinear(nn.Module):
    """A frozen base linear layer (fp32 or quantized) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scaling = config.alpha / config.rank
        # The manifest records which trainable tensor is which factor (`lora_factors`), so
        # nothing downstream parses these names.
        self.variant = config.variant
        if config.variant == LORA_XS:
            weight = _dense_weight(base, in_features, out_features)
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            r = min(config.rank, s.numel())
            self.lora_A = nn.Parameter(vh[:r].clone(), requires_grad=False)  # (r, in)
            self.lora_B = nn.Parameter((u[:, :r] * s[:r]).clone(), requires_grad=False)  # (out, r)
            self.lora_R = nn.Parameter(torch.zeros(r, r))  # (r, r): the only trained values
        else:
            self.lora_A = nn.Parameter(torch.empty(config.rank, in_features))  # (r, in)
            self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))  # (out, r)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as in the LoRA paper / PEFT
            self.lora_A.requires_grad_(config.variant != LORA_FA)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.dropout(x) @ self.lora_A.t()
        if self.variant == LORA_XS:
            low = low @ self.lora_R.t()
        update = low @ self.lora_B.t()
        return self.base(x) + update * self.scaling


def attach_lora(blocks: nn.ModuleList, first_block: int, config: LoraConfig) -> list[str]:
    """Wrap the target linears of blocks[first_block:] in LoraLinear, in place.

    Returns the qualified names (relative to `blocks`) of the wrapped modules.

    Raises:
        ValueError: when no target matches; the message lists the linear names available.
    """
    wrapped: list[str] = []
    seen: set[str] = set()
    for index in range(first_block, len(blocks)):
        for name, module in list(blocks[index].named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            seen.add(leaf)
            if leaf in config.targets:
                parent = blocks[index].get_submodule(name.rsplit(".", 1)[0]) if "." in name else blocks[index]
                setattr(parent, leaf, LoraLinear(module, module.in_features, module.out_features, config))
                wrapped.append(f"{index}.{name}")
    if not wrapped:
        raise ValueError(
            f"LoRA targets {','.join(config.targets)!r} match no linear layer; "
            f"available: {','.join(sorted(seen))}"
        )
    return wrapped


def lora_factors(model: nn.Module) -> dict[str, LoraFactor]:
    """The manifest's LoRA roles: {parameter name in `model`: its layer and factor}, for every LoraLinear.

    Parameters are matched by identity, not by name, so the names `named_parameters` gives
    (which the exported graph and the manifest use) are whatever the model nests them under.
    """
    roles: dict[int, LoraFactor] = {}
    for layer, module in model.named_modules():
        if isinstance(module, LoraLinear) and module.variant == LORA:  # the variants' mean is exact as is
            roles[id(module.lora_A)] = LoraFactor(layer, "A")
            roles[id(module.lora_B)] = LoraFactor(layer, "B")
    return {name: roles[id(param)] for name, param in model.named_parameters() if id(param) in roles}


def _dense_weight(base: nn.Module, in_features: int, out_features: int) -> torch.Tensor:
    """The frozen layer's (out, in) weight in fp32, for lora-xs's SVD."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"lora-xs needs the layer's dense ({out_features}, {in_features}) weight; "
                         f"{type(base).__name__} has none (build lora-xs from the fp32 model)")
    return weight.detach().float()
