"""PEFT's `target_parameters`: LoRA on the stacked expert weights (and the
router weight) of Hugging Face mixture-of-experts checkpoints.

Hugging Face keeps a Mixtral or Qwen3-MoE layer's experts as two fused
parameters, `mlp.experts.gate_up_proj (E, 2I, H)` (gate rows, then up rows)
and `mlp.experts.down_proj (E, H, I)`, both `(experts, out, in)`, and its
router as `mlp.gate.weight (E, H)`. PEFT adapts them with
`target_parameters`; for expert `e` of a rank-`r` LoRA:

    A3 = lora_A (E*r, in) reshaped (E, r, in)          # expert-major
    B3 = lora_B (out, E*r) reshaped (out, r, E), moved to (E, out, r)
    delta[e] = scale * B3[e] @ A3[e]                   # (out, in)

KerasHub stores the same experts as `(experts, in, out)` banks: Mixtral
splits `gate_up_proj` into a gate and an intermediate bank, Qwen3-MoE keeps
it fused. Here LoRA on an exposed expert weight holds `lora_a (E, r, in)`
and `lora_b (E, r, out)`, so `lora_a = A3` and `lora_b = B3ᵀ` (split by
columns for Mixtral). Written back, Mixtral's two banks become one fused
LoRA of rank `r_gate + r_up` (the two `A`s stacked, the `B`s block-diagonal:
exact), as PEFT itself does when it converts older per-expert adapters.

PEFT's file names a parameter's factors by its module, nesting one wrapper
per targeted parameter in the order the module registers them: with both
expert parameters targeted, `gate_up_proj`'s factors are
`...experts.base_layer.lora_A.weight` and `down_proj`'s
`...experts.lora_A.weight`.
"""

import dataclasses
import re

import numpy as np

from keras_lowrank import peft_codec
from keras_lowrank import tree

PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a KerasHub MoE family keeps what a Hugging Face parameter
    holds, for decoder layer `i` (`backbone.transformer_layers[i]`)."""

    #: attribute path from a decoder layer to its expert bank / router
    bank: tuple
    router: tuple
    #: Hugging Face parameter (in the order its module registers them) ->
    #: the bank's weights that split its output rows, in order
    params: dict


FAMILIES = {
    "mixtral": Family(
        bank=("_sparse_moe_block", "expert_bank"),
        router=("_sparse_moe_block", "_sparse_feedforward_gate_dense"),
        params={
            "gate_up_proj": ("_expert_feedforward_gate_dense", "_expert_feedforward_intermediate_dense"),
            "down_proj": ("_expert_feedforward_output_dense",),
        },
    ),
    "qwen3_moe": Family(
        bank=("mlp", "expert_bank"),
        router=("mlp", "_sparse_feedforward_gate_dense"),
        params={
            "gate_up_proj": ("_expert_feedforward_gate_dense",),
            "down_proj": ("_expert_feedforward_output_dense",),
        },
    ),
}
ROUTER = "gate.weight"


def family(hf_config):
    return FAMILIES.get(hf_config.get("model_type"))


def _getpath(obj, names):
    for name in names:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


@dataclasses.dataclass
class Slot:
    """One Hugging Face parameter of decoder layer `layer` and the Keras
    layers (paths) its output rows go to, with each one's row count."""

    key: str
    module: str
    param: str
    parts: list  # [(keras path, n_out), ...]
    experts: int  # 0 for the router (a plain matrix)


def slots(model, hf_config):
    """`[Slot, ...]` of every expert parameter and router of `model` (a
    KerasHub backbone or task model, its expert weights exposed) that the
    family maps; empty for other families."""
    from keras_lowrank import bases
    from keras_lowrank import experts

    fam = family(hf_config)
    if fam is None:
        return []
    backbone = getattr(model, "backbone", None) or model
    paths = {id(e.layer): e.path for e in tree.walk(model) if e.holder is None}
    out = []
    for i, decoder in enumerate(getattr(backbone, "transformer_layers", [])):
        bank = _getpath(decoder, fam.bank)
        if bank is None:
            continue  # a dense layer (Qwen3-MoE's mlp_only_layers)
        found = experts.slots(bank)
        module = f"model.layers.{i}.mlp.experts"
        for param, names in fam.params.items():
            parts = []
            for name in names:
                slot = found.get(name)
                if slot is None:
                    break
                layer = slot.layer()
                parts.append((paths[id(layer)], bases.geometry_of(bases.base_layer(layer)).n_out))
            else:
                e = bases.geometry_of(bases.base_layer(found[names[0]].layer())).n_shared
                out.append(Slot(f"{module}.{param}", module, param, parts, e))
        router = _getpath(decoder, fam.router)
        if router is not None and id(router) in paths:
            n_out = bases.geometry_of(bases.base_layer(router)).n_out
            out.append(Slot(f"model.layers.{i}.mlp.{ROUTER}", f"model.layers.{i}.mlp.gate",
                            "weight", [(paths[id(router)], n_out)], 0))
    return out


def targeted(key, target_parameters):
    """PEFT's rule: a parameter is targeted by `t` when its full name is
    `t` or ends with `"." + t`."""
    return any(key == t or key.endswith("." + t) for t in target_parameters)


def _pattern_value(config, name, key, default):
    for pattern, value in (config.get(name) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def tensor_names(slot, chosen):
    """PEFT's names for the factors of `slot`, given the `chosen` slots of
    the same module (each targeted parameter nests one wrapper)."""
    same = [s.param for s in chosen if s.module == slot.module]
    depth = len(same) - 1 - same.index(slot.param)
    base = PREFIX + slot.module + "." + "base_layer." * depth
    return base + "lora_A.weight", base + "lora_B.weight"


def read(model, hf_config, config, tensors):
    """`({keras path: (rank, alpha, state)}, tensors left)`: the LoRA of
    every parameter `config["target_parameters"]` names, as LoRA states of
    the Keras layers it maps to. Refuses what it cannot place."""
    wanted = config.get("target_parameters") or []
    if not wanted:
        return {}, tensors
    if not isinstance(wanted, list) or not all(isinstance(t, str) for t in wanted):
        raise ValueError(f"PEFT adapter config: target_parameters must be a list of names; received {wanted!r}.")
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError("PEFT adapter: target_parameters come with plain LoRA only (as in PEFT).")
    all_slots = slots(model, hf_config)
    if not all_slots:
        raise ValueError(
            f"PEFT adapter: target_parameters {wanted} on a {hf_config.get('model_type')!r} "
            f"checkpoint: keras-lowrank maps them for {sorted(FAMILIES)} only."
        )
    chosen = [s for s in all_slots if targeted(s.key, wanted)]
    rest = dict(tensors)
    plan = {}
    for slot in chosen:
        name_a, name_b = tensor_names(slot, chosen)
        if name_a not in rest or name_b not in rest:
            raise ValueError(f"PEFT adapter: parameter {slot.key!r} is targeted but {name_a!r} is not in the file.")
        a, b = np.asarray(rest.pop(name_a), np.float32), np.asarray(rest.pop(name_b), np.float32)
        n_out = sum(n for _, n in slot.parts)
        e = max(slot.experts, 1)
        if a.shape[0] % e or b.shape != (n_out, a.shape[0]):
            raise ValueError(
                f"PEFT adapter: parameter {slot.key!r}: lora_A {a.shape} and lora_B {b.shape} "
                f"do not fit {e} experts of {n_out} outputs."
            )
        r = a.shape[0] // e
        alpha = _pattern_value(config, "alpha_pattern", slot.key, config.get("lora_alpha", 8))
        want_r = _pattern_value(config, "rank_pattern", slot.key, config.get("r", 8))
        if int(want_r) != r:
            raise ValueError(f"PEFT adapter: parameter {slot.key!r} has rank {r} in the file, {want_r} in the config.")
        if slot.experts:
            lora_a = a.reshape(e, r, -1)
            lora_b = b.reshape(n_out, r, e).transpose(2, 1, 0)  # (E, r, out)
        else:
            lora_a, lora_b = a, b.T
        start = 0
        for path, n in slot.parts:
            plan[path] = (r, alpha, {"lora_a": lora_a, "lora_b": lora_b[..., start:start + n]})
            start += n
    for name in rest:
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if any(key.startswith(s.module + ".") for s in all_slots if s.experts):
            raise ValueError(f"PEFT adapter: tensor {name!r} belongs to no targeted parameter.")
    return plan, rest


def write(slots_, entries):
    """`(tensors, {param key: rank}, {param key: alpha}, target_parameters)`
    of the LoRA `entries` (`{keras path: LoRA export entry}`) on the expert
    and router layers of `slots_`."""
    chosen = [s for s in slots_ if any(p in entries for p, _ in s.parts)]
    tensors, ranks, alphas, names = {}, {}, {}, set()
    for slot in chosen:
        parts = [(entries.get(p), n) for p, n in slot.parts]
        present = [(ent, n) for ent, n in parts if ent is not None]
        rslora = present[0][0]["rslora"]
        scale0 = _scale(present[0][0])
        rank = sum(int(ent["rank"]) for ent, _ in present)
        alpha = scale0 * (np.sqrt(rank) if rslora else rank)
        e = max(slot.experts, 1)
        n_out = sum(n for _, n in parts)
        n_in = np.shape(present[0][0]["state"]["lora_a"])[-1]
        a3 = np.zeros((e, rank, n_in), np.float32)
        b3 = np.zeros((e, n_out, rank), np.float32)
        r0, col = 0, 0
        for ent, n in parts:
            if ent is not None:
                r = int(ent["rank"])
                la = peft_codec.f32(ent["state"]["lora_a"]).reshape(e, r, n_in)
                lb = peft_codec.f32(ent["state"]["lora_b"]).reshape(e, r, n)
                a3[:, r0:r0 + r] = la
                b3[:, col:col + n, r0:r0 + r] = lb.transpose(0, 2, 1) * (_scale(ent) / scale0)
                r0 += r
            col += n
        name_a, name_b = tensor_names(slot, chosen)
        if slot.experts:
            tensors[name_a] = a3.reshape(e * rank, n_in)
            tensors[name_b] = np.ascontiguousarray(b3.transpose(1, 2, 0).reshape(n_out, rank * e))
        else:
            tensors[name_a], tensors[name_b] = a3[0], np.ascontiguousarray(b3[0])
        ranks[slot.key], alphas[slot.key] = rank, float(alpha)
        names.add(slot.key)
    return tensors, ranks, alphas, sorted(names)


def _scale(entry):
    r = float(entry["rank"])
    return float(entry["alpha"]) / (np.sqrt(r) if entry["rslora"] else r)
